//! The requests' states in chunks shared between clones of a world: the
//! oracle clones the world for every count it tries, and a clone must not
//! copy a day of requests (19 MB for 400,000) when the trial touches the
//! few hundred still in flight. Chunks are grouped in shared groups too: a
//! clone copies one pointer per group (42 for a week of 2.7 million
//! requests, where one per chunk was 2,656 and most of the oracle's time);
//! a write copies its group's pointers and its chunk first if another world
//! still shares them.

use std::sync::Arc;

use super::world::RequestState;

/// Requests per chunk.
const CHUNK: usize = 1024;
/// Chunks per group.
const GROUP: usize = 64;

type Chunk = Arc<Vec<RequestState>>;

/// Every request's state, by trace index.
#[derive(Debug, Clone, Default)]
#[allow(clippy::len_without_is_empty)]
pub struct RequestTable {
    groups: Vec<Arc<Vec<Chunk>>>,
    len: usize,
}

impl RequestTable {
    /// `len` requests, none started.
    pub fn new(len: usize) -> Self {
        let chunks: Vec<Chunk> = (0..len.div_ceil(CHUNK))
            .map(|i| Arc::new(vec![RequestState::default(); CHUNK.min(len - i * CHUNK)]))
            .collect();
        let groups = chunks.chunks(GROUP).map(|g| Arc::new(g.to_vec())).collect();
        RequestTable { groups, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn get(&self, i: usize) -> Option<&RequestState> {
        let c = i / CHUNK;
        self.groups.get(c / GROUP)?.get(c % GROUP)?.get(i % CHUNK)
    }

    /// The state to change, its group and chunk made this world's own
    /// first.
    pub fn get_mut(&mut self, i: usize) -> Option<&mut RequestState> {
        let c = i / CHUNK;
        let group = Arc::make_mut(self.groups.get_mut(c / GROUP)?);
        Arc::make_mut(group.get_mut(c % GROUP)?).get_mut(i % CHUNK)
    }

    /// The states from index `from` on, in order.
    pub fn iter_from(&self, from: usize) -> impl Iterator<Item = &RequestState> {
        let from = from.min(self.len);
        let c = from / CHUNK;
        self.groups
            .iter()
            .flat_map(|g| g.iter())
            .skip(c)
            .flat_map(|chunk| chunk.iter())
            .skip(from % CHUNK)
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
        let chunk = |t: &RequestTable, i: usize| Arc::clone(&t.groups[i / GROUP][i % GROUP]);
        let mut a = RequestTable::new(2500);
        assert_eq!((a.len(), a.groups.len(), a.groups[0].len()), (2500, 1, 3));
        assert_eq!(chunk(&a, 2).len(), 452);
        if let Some(s) = a.get_mut(10) {
            s.fate = Fate::Done;
        }
        let mut b = a.clone();
        assert!(Arc::ptr_eq(&a.groups[0], &b.groups[0]));
        if let Some(s) = b.get_mut(2000) {
            s.fate = Fate::Rejected;
        }
        // Only the written chunk was copied (and its group's pointers).
        assert!(!Arc::ptr_eq(&a.groups[0], &b.groups[0]));
        assert!(Arc::ptr_eq(&chunk(&a, 0), &chunk(&b, 0)));
        assert!(!Arc::ptr_eq(&chunk(&a, 1), &chunk(&b, 1)));
        assert_eq!(a.get(2000).map(|s| s.fate), Some(Fate::Pending));
        assert_eq!(b.get(2000).map(|s| s.fate), Some(Fate::Rejected));
        assert_eq!(b.get(10).map(|s| s.fate), Some(Fate::Done));
        assert!(a.get(2500).is_none());
        assert!(a.get_mut(2500).is_none());
        assert_eq!(b.iter_from(1999).count(), 501);
        assert_eq!(b.to_vec_from(2000)[0].fate, Fate::Rejected);
        assert_eq!(b.iter_from(9999).count(), 0);
    }

    #[test]
    fn groups_hold_every_request_in_order_across_their_bounds() {
        let len = 2 * GROUP * CHUNK + 5;
        let mut t = RequestTable::new(len);
        assert_eq!(t.groups.len(), 3);
        for i in [
            0,
            CHUNK - 1,
            CHUNK,
            GROUP * CHUNK - 1,
            GROUP * CHUNK,
            len - 1,
        ] {
            if let Some(s) = t.get_mut(i) {
                s.fate = Fate::Done;
            }
        }
        let done: Vec<usize> = t
            .iter_from(0)
            .enumerate()
            .filter(|(_, s)| s.fate == Fate::Done)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(
            done,
            [
                0,
                CHUNK - 1,
                CHUNK,
                GROUP * CHUNK - 1,
                GROUP * CHUNK,
                len - 1
            ]
        );
        assert_eq!(
            t.iter_from(GROUP * CHUNK - 1).count(),
            len - (GROUP * CHUNK - 1)
        );
        assert_eq!(t.iter_from(len).count(), 0);
        assert!(t.get(len).is_none());
        // A clone shares every group until it writes one.
        let mut u = t.clone();
        if let Some(s) = u.get_mut(GROUP * CHUNK + 7) {
            s.fate = Fate::Rejected;
        }
        assert!(Arc::ptr_eq(&t.groups[0], &u.groups[0]));
        assert!(!Arc::ptr_eq(&t.groups[1], &u.groups[1]));
        assert!(Arc::ptr_eq(&t.groups[2], &u.groups[2]));
        assert_eq!(
            t.get(GROUP * CHUNK + 7).map(|s| s.fate),
            Some(Fate::Pending)
        );
    }
}
