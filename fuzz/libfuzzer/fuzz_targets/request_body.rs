#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| scalecar_fuzz::request_body(data));
