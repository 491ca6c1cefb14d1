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
tok() { python3 -c "import json,sys;print(json.load(open('$S/extra/tokens.json'))[sys.argv[1]])" "$1"; }

# one argument per line: MODULE CONFIG [options of tollgate-micro]
case_args() {
  local rsp="cache-control: public, max-age=86400"
  case "$1" in
    probe) printf '%s\n' probe /tmp/tollgate-empty.json ;;
    ratelimit-never) printf '%s\n' ratelimit $S/ratelimit/tollgate-never.json --path /bench/rl -H "x-api-key: bench-key-1" ;;
    ratelimit-limiting) printf '%s\n' ratelimit $S/ratelimit/tollgate-limiting.json --path /bench/rl ;;
    cache-hit) printf '%s\n' cache $S/cache/tollgate-cache.json --path /cacheable/hit --response-header "$rsp" ;;
    cache-miss) printf '%s\n' cache $S/cache/tollgate-cache.json --path '/cacheable/miss/{n}' --response-header "$rsp" ;;
    auth-jwt-es256) printf '%s\n' auth $S/auth/tollgate-cold.json --path /bench/auth -H "authorization: Bearer $(tok ES256)" ;;
    auth-jwt-rs256) printf '%s\n' auth $S/auth/tollgate-cold.json --path /bench/auth -H "authorization: Bearer $(tok RS256)" ;;
    auth-jwt-es256-cached) printf '%s\n' auth $S/auth/tollgate-cached.json --path /bench/auth -H "authorization: Bearer $(tok ES256)" ;;
    auth-apikey) printf '%s\n' auth $S/auth/tollgate-cold.json --path /bench/auth -H "x-api-key: $(tok api_key)" ;;
  esac
}

CASES=("$@")
[ ${#CASES[@]} -gt 0 ] || CASES=(probe ratelimit-never ratelimit-limiting cache-hit cache-miss auth-jwt-es256 auth-jwt-rs256 auth-jwt-es256-cached auth-apikey)
for c in "${CASES[@]}"; do
  mapfile -t a < <(case_args "$c")
  if [ ${#a[@]} -lt 2 ]; then echo "$c: no such case"; continue; fi
  module=${a[0]}; config=${a[1]}; rest=("${a[@]:2}")
  n=20000; case "$c" in auth-jwt-es256|auth-jwt-rs256) n=2000 ;; esac
  speed=$("$M" "$module" "$config" "$n" "${rest[@]}")
  valgrind --tool=callgrind --callgrind-out-file=/tmp/tollgate-cg-$c.out "$M" "$module" "$config" $((n / 10)) "${rest[@]}" >/dev/null 2>&1
  {
    echo "# $c: $module with $config ${rest[*]}" | sed -E "s/Bearer [A-Za-z0-9._-]+/Bearer <token from bench\/scenarios\/extra\/tokens.json>/"
    echo "# host speed: $speed"
    echo "# callgrind, $((n / 10)) requests (+100 warm-up); instructions, inclusive:"
    callgrind_annotate --inclusive=yes /tmp/tollgate-cg-$c.out 2>/dev/null | grep -E '^ *[0-9,]+ \(' | sed -n '1,60p' | cut -c1-220
    echo
    echo "# self:"
    callgrind_annotate /tmp/tollgate-cg-$c.out 2>/dev/null | grep -E '^ *[0-9,]+ \(' | sed -n '1,30p' | cut -c1-220
  } > "$OUT/profile-$c.txt"
  echo "$c: $speed -> $OUT/profile-$c.txt"
done
