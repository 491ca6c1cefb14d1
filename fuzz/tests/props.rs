//! Every fuzz target in `cargo test`: the committed corpus, then a fixed number of inputs
//! from a fixed seed. Bounded by count, so the run is the same on every machine; a failure
//! leaves its input in `target/fuzz-failures/<target>/`.

use tollgate_fuzz::targets::ALL;
use tollgate_fuzz::{replay_corpus, run_seeded, Target};

/// The seed of the seeded runs; change it to look elsewhere (`FUZZ_SEED=n cargo test`).
fn seed() -> u64 {
    std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_261_202)
}

fn run(name: &str, target: Target, cases: u32) {
    replay_corpus(name, target);
    run_seeded(name, target, cases, seed());
}

macro_rules! targets {
    ($($name:ident),* $(,)?) => {
        $(#[test]
        fn $name() {
            let name = stringify!($name);
            let (_, target, cases) = ALL
                .iter()
                .find(|(n, _, _)| *n == name)
                .copied()
                .expect("a known target");
            run(name, target, cases);
        })*

        #[test]
        fn every_target_has_a_test() {
            let tested = [$(stringify!($name)),*];
            for (name, _, _) in ALL {
                assert!(tested.contains(name), "no test runs the target `{name}`");
            }
        }
    };
}

targets!(
    route,
    request,
    scalars,
    abi_map,
    config_json,
    config_values,
    combined_config,
    jws,
    b64_json,
    jwk,
    signature,
    verifiers,
    auth_request,
    auth_remote,
    template,
    shape,
    aggregate_request,
    ratelimit_request,
    cache_headers,
);

#[test]
fn every_target_has_a_libfuzzer_entry_point() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).expect("fuzz/Cargo.toml");
    for (name, _, _) in ALL {
        let file = format!("fuzz_targets/{name}.rs");
        assert!(
            manifest.contains(&format!("name = \"{name}\"\npath = \"{file}\"")),
            "no [[bin]] `{name}` in fuzz/Cargo.toml"
        );
        let text = std::fs::read_to_string(root.join(&file)).expect("the entry point");
        assert!(text.contains(&format!("run(\"{name}\", data)")), "{file}");
    }
}
