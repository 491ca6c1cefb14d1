//! libFuzzer entry point of the `config_json` target (see `tollgate_fuzz::targets`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tollgate_fuzz::targets::run("config_json", data));
