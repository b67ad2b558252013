//! Prefill/decode group coordination. (Being written.)
