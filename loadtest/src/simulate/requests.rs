//! The requests' states in chunks shared between clones of a world: the
//! oracle clones the world for every count it tries, and a clone must not
//! copy a day of requests (19 MB for 400,000) when the trial touches the
//! few hundred still in flight. A clone copies one pointer per chunk; a
//! write copies its chunk first if another world still shares it.

use std::sync::Arc;

use super::world::RequestState;

/// Requests per chunk.
const CHUNK: usize = 1024;

/// Every request's state, by trace index.
#[derive(Debug, Clone, Default)]
#[allow(clippy::len_without_is_empty)]
pub struct RequestTable {
    chunks: Vec<Arc<Vec<RequestState>>>,
    len: usize,
}

impl RequestTable {
    /// `len` requests, none started.
    pub fn new(len: usize) -> Self {
        let chunks = (0..len.div_ceil(CHUNK))
            .map(|i| Arc::new(vec![RequestState::default(); CHUNK.min(len - i * CHUNK)]))
            .collect();
        RequestTable { chunks, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn get(&self, i: usize) -> Option<&RequestState> {
        self.chunks.get(i / CHUNK)?.get(i % CHUNK)
    }

    /// The state to change, its chunk made this world's own first.
    pub fn get_mut(&mut self, i: usize) -> Option<&mut RequestState> {
        Arc::make_mut(self.chunks.get_mut(i / CHUNK)?).get_mut(i % CHUNK)
    }

    /// The states from index `from` on, in order.
    pub fn iter_from(&self, from: usize) -> impl Iterator<Item = &RequestState> {
        self.chunks
            .iter()
            .flat_map(|c| c.iter())
            .skip(from.min(self.len))
    }

    /// The states from index `from` on, as a vector.
    pub fn to_vec_from(&self, from: usize) -> Vec<RequestState> {
        self.iter_from(from).copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulate::Fate;

    #[test]
    fn a_clone_shares_until_written_and_writes_stay_apart() {
        let mut a = RequestTable::new(2500);
        assert_eq!((a.len(), a.chunks.len()), (2500, 3));
        assert_eq!(a.chunks.last().map(|c| c.len()), Some(452));
        if let Some(s) = a.get_mut(10) {
            s.fate = Fate::Done;
        }
        let mut b = a.clone();
        assert!(Arc::ptr_eq(&a.chunks[0], &b.chunks[0]));
        if let Some(s) = b.get_mut(2000) {
            s.fate = Fate::Rejected;
        }
        // Only the written chunk was copied.
        assert!(Arc::ptr_eq(&a.chunks[0], &b.chunks[0]));
        assert!(!Arc::ptr_eq(&a.chunks[1], &b.chunks[1]));
        assert_eq!(a.get(2000).map(|s| s.fate), Some(Fate::Pending));
        assert_eq!(b.get(2000).map(|s| s.fate), Some(Fate::Rejected));
        assert_eq!(b.get(10).map(|s| s.fate), Some(Fate::Done));
        assert!(a.get(2500).is_none());
        assert!(a.get_mut(2500).is_none());
        assert_eq!(b.iter_from(1999).count(), 501);
        assert_eq!(b.to_vec_from(2000)[0].fate, Fate::Rejected);
        assert_eq!(b.iter_from(9999).count(), 0);
    }
}
