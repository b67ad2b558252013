//! Per-pool windowed signals. (Being written.)
