//! Errors that name what was wrong: the key (as the user wrote it, with or
//! without the `scalecar.io/` prefix), the value and what is allowed.

use std::fmt;

/// One rejected key or combination of keys.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct PolicyError {
    /// The key as the user wrote it (or the first of a combination).
    pub key: String,
    /// The whole message, naming key, value and what is allowed.
    pub message: String,
}

impl PolicyError {
    /// `key: "value" problem`, e.g. `scalecar.io/max-replicas: "abc" is not an integer`.
    pub fn value(key: &str, value: &str, problem: impl fmt::Display) -> Self {
        PolicyError {
            key: key.to_string(),
            message: format!("{key}: {value:?} {problem}"),
        }
    }

    /// A message about a combination of keys.
    pub fn combination(key: &str, message: impl Into<String>) -> Self {
        PolicyError {
            key: key.to_string(),
            message: message.into(),
        }
    }
}

/// Every problem of one input: a user fixes them all in one go.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl PolicyErrors {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn push(&mut self, e: PolicyError) {
        self.0.push(e);
    }

    pub fn iter(&self) -> impl Iterator<Item = &PolicyError> {
        self.0.iter()
    }
}

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            f.write_str(&e.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

/// Levenshtein distance, for did-you-mean suggestions.
pub(crate) fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// The closest of `known` to `word`, if close enough to be a typo.
pub(crate) fn did_you_mean<'a>(
    word: &str,
    known: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    known
        .into_iter()
        .map(|k| (edit_distance(word, k), k))
        .filter(|(d, k)| *d <= 3.max(k.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distance_and_suggestion() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(
            did_you_mean("max-replica", ["min-replicas", "max-replicas"]),
            Some("max-replicas")
        );
        assert_eq!(did_you_mean("zzzzzzzzzz", ["window"]), None);
    }

    #[test]
    fn errors_list_one_per_line() {
        let mut e = PolicyErrors::default();
        e.push(PolicyError::value("a", "1", "is wrong"));
        e.push(PolicyError::combination("b", "b is wrong too"));
        assert_eq!(e.to_string(), "a: \"1\" is wrong\nb is wrong too");
    }
}
