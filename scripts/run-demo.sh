#!/usr/bin/env bash
# Start the demo services, Redis and the rate limit service (global limits), and Envoy with
# envoy/envoy.yaml; Ctrl-C stops them all.
set -euo pipefail
cd "$(dirname "$0")/.."
ENVOY=${ENVOY:-.venv/bin/envoy}

# users and orders answer 401 to a request without the identity the gateway's auth filter sets
args=(--listen users=127.0.0.1:8081 --listen orders=127.0.0.1:8082 --listen products=127.0.0.1:8083
      --require-identity users,orders)
[ -f envoy/demo-keys/jwks.json ] && args+=(--jwks envoy/demo-keys/jwks.json)
target/release/tollgate-demo "${args[@]}" &
pids=($!)
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT INT TERM

# Redis (counters of the global limits, in memory only) and tollgate-rls (Envoy's RLS protocol).
REDIS_PORT=${REDIS_PORT:-6380}
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --loglevel warning &
pids+=($!)
target/release/tollgate-rls --listen 127.0.0.1:8091 --limits envoy/rls-limits.yaml \
  --redis "redis://127.0.0.1:$REDIS_PORT" &
pids+=($!)

for port in 8081 8082 8083; do
  for _ in $(seq 50); do curl -fs "127.0.0.1:$port/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
done
# tollgate-rls listens once Redis answered.
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/8091) 2>/dev/null && break; sleep 0.1; done
echo "gateway: http://127.0.0.1:10000  (try: curl -i 127.0.0.1:10000/api/products/1)"
echo "admin:   http://127.0.0.1:9901"
"$ENVOY" -c envoy/envoy.yaml --use-dynamic-base-id --concurrency "${CONCURRENCY:-2}" -l "${LOG_LEVEL:-info}"
