#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| scalecar_fuzz::kube_objects(data));
