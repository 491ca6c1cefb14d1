//! libFuzzer entry point of the `cache_headers` target (see `tollgate_fuzz::targets`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tollgate_fuzz::targets::run("cache_headers", data));
