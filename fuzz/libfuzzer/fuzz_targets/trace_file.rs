#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| scalecar_fuzz::trace_file(data));
