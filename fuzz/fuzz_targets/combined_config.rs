//! libFuzzer entry point of the `combined_config` target (see `tollgate_fuzz::targets`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tollgate_fuzz::targets::run("combined_config", data));
