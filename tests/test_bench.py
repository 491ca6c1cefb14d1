"""The benchmark machinery (bench/bench.py, bench/loadgen) still works: bench-quick's code path on a
few scenarios, the open-loop load generator's latency accounting, and how a broken or unbuildable
variant is reported. Nothing here asserts how fast anything is."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness import ROOT

BENCH = ROOT / "bench" / "bench.py"
LOADGEN = ROOT / "bench" / "loadgen" / "target" / "release" / "tollgate-loadgen"


@pytest.fixture(scope="module", autouse=True)
def loadgen_built():
    """`make build` builds the load generator; a test never runs cargo."""
    if not LOADGEN.exists():
        pytest.fail(f"{LOADGEN} is missing: run `make build` first")


def run_bench(tmp_path: Path, *args: str) -> tuple[str, dict, str]:
    out = tmp_path / "results.md"
    p = subprocess.run([sys.executable, str(BENCH), "--quick", "--no-memory", "--output", str(out), *args],
                       capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    return out.read_text(), json.loads(out.with_suffix(".json").read_text()), p.stderr


def variants(data: dict) -> dict:
    return {(s["id"], v["name"]): v for s in data["scenarios"] for v in s["variants"]}


def test_bench_quick_measures_baselines_and_a_native_filter(tmp_path):
    md, data, _ = run_bench(tmp_path, "--only", "baseline", "--only", "auth-apikey")
    vs = variants(data)
    for key in [("baseline", "no filter"), ("baseline", "probe wasm {}"), ("auth-apikey", "native api_key_auth")]:
        v = vs[key]
        assert v["failure"] is None and v["skip"] is None, v
        for metric in ("cpu_us", "p50_ms", "p99_ms", "rps"):
            assert len(v["samples"][metric]) == 1 and v["samples"][metric][0] > 0, (key, metric, v)
    # the machine is described and every runnable row has its reproduce command
    assert "Machine: " in md and "Envoy " in md and "CPUs" in md
    assert "bench/bench.py --only auth-apikey" in md
    assert "| no filter |" in md and "| probe wasm {} |" in md


def test_wrong_answers_fail_the_row_and_missing_modules_are_na(tmp_path):
    scen = tmp_path / "scen"
    scen.mkdir()
    (scen / "scenarios.yaml").write_text("""
scenarios:
- id: broken
  title: A variant whose answers are not the expected ones
  request: {path: /bench, headers: {x-api-key: wrong}}
  variants:
  - name: api key refused
    kind: native
    http_filters:
    - name: envoy.filters.http.api_key_auth
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.http.api_key_auth.v3.ApiKeyAuth
        credentials: [{key: right, client: c}]
        key_sources: [{header: x-api-key}]
  - name: not built
    kind: tollgate
    filters: [{module: no_such_module, config: {}}]
  - name: refused config
    kind: tollgate
    filters: [{module: probe, config: {no_such_field: 1}}]
- id: mini
  title: A Tollgate variant beside a native one
  request: {path: /bench, headers: {x-api-key: right}}
  variants:
  - name: native api key
    kind: native
    http_filters:
    - name: envoy.filters.http.api_key_auth
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.http.api_key_auth.v3.ApiKeyAuth
        credentials: [{key: right, client: c}]
        key_sources: [{header: x-api-key}]
  - name: probe as tollgate
    kind: tollgate
    filters: [{module: probe, config: {}}]
""")
    md, data, _ = run_bench(tmp_path, "--scenarios", str(scen), "--only", "broken", "--only", "mini")
    vs = variants(data)
    refused = vs[("broken", "api key refused")]
    assert refused["failure"] and "401" in refused["failure"], refused
    assert "n/a: not built" in vs[("broken", "not built")]["skip"]
    assert "n/a: gateway refused" in vs[("broken", "refused config")]["skip"]
    assert "n/a: not built" in md and "failed: warm-up" in md
    # a working Tollgate variant gets its row in the summary, compared with the scenario's native one
    assert vs[("mini", "probe as tollgate")]["failure"] is None
    assert "## Summary: Tollgate vs the native equivalent" in md
    assert "| mini | probe as tollgate | native api key |" in md


def test_open_loop_latency_counts_the_queue(services):
    """1 connection, 25 requests/s due, each answer takes 100 ms: the connection can do 10/s, so the
    requests queue; latency measured from when each was due grows far beyond the 100 ms service time
    (a closed-loop generator would report ~100 ms)."""
    port = services.ports["users"]
    p = subprocess.run([str(LOADGEN), "--addr", f"127.0.0.1:{port}", "--req", "GET /users/1?delay=100", "-c", "1",
                        "--rate", "25", "--duration", "1"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["ops"] == 25 and r["errors"] == 0 and r["statuses"] == {"200": 25}
    assert r["latency_us"]["p50"] >= 100_000
    # the last requests waited for about 24 * 100 ms - 24 * 40 ms = 1.4 s
    assert r["latency_us"]["max"] >= 1_000_000, r


def test_loadgen_substitutes_the_operation_number(services):
    port = services.ports["orders"]
    services.reset_stats()
    p = subprocess.run([str(LOADGEN), "--addr", f"127.0.0.1:{port}", "--req", "GET /orders/{n}", "-c", "2",
                        "--ops", "6", "--start", "40"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["ops"] == 6
    for n in range(40, 46):
        assert services.hits("orders", f"/orders/{n}") == 1
