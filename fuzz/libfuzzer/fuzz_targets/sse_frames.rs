#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| scalecar_fuzz::sse_frames(data));
