#!/usr/bin/env bash
# Hot spots of the filters' own code: bench/micro runs a filter's pure core (the code of the .wasm,
# compiled for the host) over MemHost under callgrind, with the benchmark scenarios' configurations
# and requests. Writes bench/results/profile-<case>.txt (top functions, inclusive and self cost).
#
#   bench/profile.sh               # every case
#   bench/profile.sh cache-hit     # one case
#
# Envoy's V8 gives JIT-compiled wasm no symbols, so a profile of Envoy itself (perf) only splits
# time into V8 / JIT code / Envoy / kernel; this is where the filters' functions get names.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "installing valgrind"; apt-get install -y -q valgrind; }
cargo build --release -q --manifest-path bench/micro/Cargo.toml
M=bench/micro/target/release/tollgate-micro
S=bench/scenarios
OUT=bench/results
mkdir -p "$OUT"
echo '{}' > /tmp/tollgate-empty.json
TOKEN_ES=$(python3 -c 'import json;print(json.load(open("bench/scenarios/extra/tokens.json"))["ES256"])')

case_args() {
  case "$1" in
    probe) echo "probe /tmp/tollgate-empty.json" ;;
    ratelimit-never) echo "ratelimit $S/ratelimit/tollgate-never.json --path /bench/rl -H x-api-key:bench-key-1" ;;
    ratelimit-limiting) echo "ratelimit $S/ratelimit/tollgate-limiting.json --path /bench/rl" ;;
    cache-hit) echo "cache $S/cache/tollgate-cache.json --path /cacheable/hit --response-header cache-control:public,max-age=86400" ;;
    cache-miss) echo "cache $S/cache/tollgate-cache.json --path /cacheable/miss/{n} --response-header cache-control:public,max-age=86400" ;;
    auth-*) [ -f "$S/extra/micro-$1.args" ] && cat "$S/extra/micro-$1.args" ;;
  esac
}

CASES=("$@")
[ ${#CASES[@]} -gt 0 ] || CASES=(probe ratelimit-never ratelimit-limiting cache-hit cache-miss auth-jwt-es256 auth-jwt-rs256 auth-apikey)
for c in "${CASES[@]}"; do
  args=$(case_args "$c" || true)
  if [ -z "$args" ]; then echo "$c: no micro case, skipped"; continue; fi
  read -r module config rest <<<"$args"
  # shellcheck disable=SC2086
  set -- $rest
  rest=("$@")
  rest=("${rest[@]//TOKEN_ES/$TOKEN_ES}")
  speed=$("$M" "$module" "$config" 20000 "${rest[@]}")
  valgrind --tool=callgrind --callgrind-out-file=/tmp/tollgate-cg-$c.out "$M" "$module" "$config" 2000 "${rest[@]}" >/dev/null 2>&1
  {
    echo "# $c: $module with $config ${rest[*]}"
    echo "# host speed: $speed"
    echo "# callgrind, 2000 requests (+100 warm-up); instructions, inclusive:"
    callgrind_annotate --inclusive=yes /tmp/tollgate-cg-$c.out 2>/dev/null | grep -E '^ *[0-9,]+ \(' | sed -n '1,60p' | cut -c1-220
    echo
    echo "# self:"
    callgrind_annotate /tmp/tollgate-cg-$c.out 2>/dev/null | grep -E '^ *[0-9,]+ \(' | sed -n '1,30p' | cut -c1-220
  } > "$OUT/profile-$c.txt"
  echo "$c: $speed -> $OUT/profile-$c.txt"
done
