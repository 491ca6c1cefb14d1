//! libFuzzer entry point of the `config_values` target (see `tollgate_fuzz::targets`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tollgate_fuzz::targets::run("config_values", data));
