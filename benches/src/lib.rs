//! scalecar-benches: criterion benchmarks of scalecar's hot paths. The
//! benchmarks live in `benches/`; this library is empty on purpose.
