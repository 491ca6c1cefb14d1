//! libFuzzer entry point of the `ratelimit_request` target (see `tollgate_fuzz::targets`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tollgate_fuzz::targets::run("ratelimit_request", data));
