//! Property and fuzz targets for the code that reads untrusted bytes: the route matcher, the
//! request helpers, the proxy-wasm map format, every filter's configuration, JOSE parsing and
//! verification, claims, credential extraction, path templates and JSON shaping.
//!
//! Each target is a function of a byte slice ([`targets::ALL`]). It turns the bytes into
//! structured input with [`arbitrary::Unstructured`] (so that the same target serves a seeded
//! random loop and a coverage-guided fuzzer), runs the code under test and asserts that it does
//! not panic and that its cheap invariants hold (a round trip, a refusal that names its field,
//! a matcher that never matches a path its prefix excludes).
//!
//! Two ways to run them:
//! - `cargo test -p tollgate-fuzz` (part of `make test`): every file of the committed corpus
//!   (`fuzz/corpus/<target>/`), then a fixed number of inputs from a fixed seed
//!   ([`run_seeded`]); the same cases on every machine, bounded by count, not time.
//! - `make fuzz`: `cargo fuzz` (libFuzzer) on each target for `FUZZ_SECONDS`.
//!
//! A failing input is written to `target/fuzz-failures/<target>/` so that it can be replayed
//! and kept in the corpus as a regression.

pub mod gen;
pub mod seeds;
pub mod targets;

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::path::PathBuf;

/// A target: bytes in, panics on a broken invariant.
pub type Target = fn(&[u8]);

/// SplitMix64: a small, fixed pseudo-random generator, so that the seeded runs are the same
/// everywhere.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Fill a buffer.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

fn name_seed(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Where failing inputs are written: `target/fuzz-failures/<target>/` of the workspace.
pub fn failures_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/fuzz-failures")
        .join(target)
}

/// The committed corpus of a target: `fuzz/corpus/<target>/`.
pub fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target)
}

/// Run `target` on `input`; on a panic, keep the input in [`failures_dir`] and panic again
/// with its file name.
pub fn run_one(name: &str, target: Target, input: &[u8], label: &str) {
    if let Err(e) = catch_unwind(AssertUnwindSafe(|| target(input))) {
        let dir = failures_dir(name);
        let file = dir.join(label);
        let saved = std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::write(&file, input))
            .is_ok();
        eprintln!(
            "fuzz target `{name}` failed on input {label} ({} bytes){}",
            input.len(),
            if saved {
                format!(", saved as {}", file.display())
            } else {
                String::new()
            }
        );
        resume_unwind(e);
    }
}

/// Replay every file of the target's committed corpus; returns how many there were.
pub fn replay_corpus(name: &str, target: Target) -> usize {
    let Ok(entries) = std::fs::read_dir(corpus_dir(name)) else {
        return 0;
    };
    let mut files: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    files.sort();
    let mut n = 0;
    for f in files {
        if let Ok(bytes) = std::fs::read(&f) {
            let label = f
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            run_one(name, target, &bytes, &label);
            n += 1;
        }
    }
    n
}

/// Run `target` on `cases` random inputs drawn from `seed` (mixed with the target's name).
/// Lengths vary: mostly short inputs, some up to 4 KiB.
pub fn run_seeded(name: &str, target: Target, cases: u32, seed: u64) {
    let mut rng = Rng::new(seed ^ name_seed(name));
    let mut buf = Vec::new();
    for case in 0..cases {
        let r = rng.next_u64();
        let len = match r % 20 {
            0..=9 => (r >> 8) % 128,
            10..=16 => (r >> 8) % 1024,
            _ => (r >> 8) % 4096,
        };
        buf.resize(usize::try_from(len).unwrap_or(0), 0);
        rng.fill(&mut buf);
        run_one(name, target, &buf, &format!("seed-{seed}-case-{case}"));
    }
}
