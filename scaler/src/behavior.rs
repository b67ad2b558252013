//! What happens to a decision after the algorithm. (Being written.)
