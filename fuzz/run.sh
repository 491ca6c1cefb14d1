#!/usr/bin/env bash
# Coverage-guided fuzzing of every target with cargo fuzz (libFuzzer): `make fuzz`.
#
#   FUZZ_SECONDS=60        time per target (default 60), so a run is bounded
#   FUZZ_TARGETS="jws route"  some targets (default: all, from `cargo fuzz list`)
#   FUZZ_SANITIZER=none    none (default: works on the stable toolchain as it is) or address
#                          (needs -Zsanitizer: set RUSTC_BOOTSTRAP=1 on stable, done here)
#   FUZZ_JOBS=1            libFuzzer processes per target
#
# New inputs go to target/fuzz-corpus/<target>/ (the committed seeds in fuzz/corpus/<target>/
# are read, never written); a crash leaves its input in target/fuzz-artifacts/<target>/ and
# makes the run fail. Replay one with `cargo test -p tollgate-fuzz` after copying it into
# fuzz/corpus/<target>/ (that is how regressions are kept), or run the binary on it.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

SECONDS_PER_TARGET=${FUZZ_SECONDS:-60}
SANITIZER=${FUZZ_SANITIZER:-none}
JOBS=${FUZZ_JOBS:-1}
TARGET_DIR=target/fuzz
if [ "$SANITIZER" != none ]; then TARGET_DIR=target/fuzz-$SANITIZER; fi

log() { echo "fuzz: $*" >&2; }

if ! cargo fuzz --version >/dev/null 2>&1; then
  log "installing cargo-fuzz from crates.io"
  cargo install --locked cargo-fuzz
fi

# libFuzzer's flags: the stable toolchain accepts the coverage flags cargo fuzz passes; only a
# sanitizer needs -Z flags, which RUSTC_BOOTSTRAP=1 allows on stable.
if [ "$SANITIZER" != none ]; then export RUSTC_BOOTSTRAP=1; fi
# The workspace's release profile (fat LTO, one codegen unit) is for the wasm modules; the
# fuzzers build much faster without it and fuzz as well.
export CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16

TARGETS=${FUZZ_TARGETS:-$(cargo fuzz list)}
log "building ${TARGETS//$'\n'/ } (sanitizer: $SANITIZER)"
# cargo fuzz builds one target, or all of them.
one=()
if [ "$(wc -w <<<"$TARGETS")" -eq 1 ]; then one=("$TARGETS"); fi
cargo fuzz build --sanitizer "$SANITIZER" --features libfuzzer --target-dir "$TARGET_DIR" "${one[@]}"
BIN=$TARGET_DIR/$(rustc -vV | sed -n 's/^host: //p')/release

failed=()
for t in $TARGETS; do
  corpus=target/fuzz-corpus/$t artifacts=target/fuzz-artifacts/$t
  mkdir -p "$corpus" "$artifacts" "fuzz/corpus/$t"
  log "$t: ${SECONDS_PER_TARGET}s"
  out=$(mktemp)
  parallel=()
  # With -jobs, libFuzzer writes fuzz-N.log into the working directory: keep them in target/.
  if [ "$JOBS" -gt 1 ]; then parallel=(-jobs="$JOBS" -workers="$JOBS"); fi
  if (mkdir -p target/fuzz-logs && cd target/fuzz-logs &&
      "$ROOT/$BIN/$t" "$ROOT/$corpus" "$ROOT/fuzz/corpus/$t" -max_total_time="$SECONDS_PER_TARGET" \
        -timeout=10 -rss_limit_mb=2048 -max_len=8192 "${parallel[@]}" \
        -artifact_prefix="$ROOT/$artifacts/" -print_final_stats=1) >"$out" 2>&1; then
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$out" | tail -1)
    cov=$(grep -o 'cov: [0-9]*' "$out" | tail -1)
    log "$t: ok, ${runs:-?} runs, ${cov:-cov: ?}, corpus $(find "$corpus" -type f | wc -l) inputs"
  else
    failed+=("$t")
    grep -E 'panicked at|SUMMARY|Test unit written|ERROR' "$out" | head -20 >&2 || true
    log "$t: FAILED (input in $artifacts/)"
  fi
  rm -f "$out"
done

if [ ${#failed[@]} -gt 0 ]; then
  log "failed: ${failed[*]}"
  exit 1
fi
log "every target ran ${SECONDS_PER_TARGET}s without a failure"
