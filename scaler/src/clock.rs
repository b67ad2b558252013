//! Injectable time. (Being written: see the signals work.)
