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


# ---------------------------------------------------------------------------------------------
# bench/instr.py (instructions per request under callgrind): its parsing and arithmetic, without
# valgrind (`make bench-instr` runs the tool itself).

sys.path.insert(0, str(ROOT / "bench"))
import instr  # noqa: E402

CALLGRIND_DUMP = """# callgrind format
version: 1
creator: callgrind-3.19.0
pid: 4242
cmd:  /x/envoy -c envoy.json
part: 1

desc: I1 cache:
desc: Timerange: Basic block 12 - 345
desc: Trigger: Program termination

positions: line
events: Ir
summary: 187654321

ob=(1) /x/envoy
fn=(1) main
0 17
totals: 187654321
"""


def test_instr_reads_the_dump_and_divides_by_the_requests():
    assert instr.dump_total(CALLGRIND_DUMP) == 187_654_321
    # a dump without its summary line: the totals at its end
    assert instr.dump_total(CALLGRIND_DUMP.replace("summary: 187654321\n", "")) == 187_654_321
    with pytest.raises(ValueError):
        instr.dump_total("events: Ir\nfn=main\n0 5\n")
    assert instr.per_request(187_654_321, 1000) == pytest.approx(187_654.321)
    with pytest.raises(ValueError):
        instr.per_request(5, 0)
    # the idle gateway's work per second, times the window's seconds, is subtracted
    rate = instr.idle_rate(2_000_000, 20.0)
    assert rate == pytest.approx(100_000)
    assert instr.per_request(187_654_321, 1000, 30.0, rate) == pytest.approx(184_654.321)
    with pytest.raises(ValueError):
        instr.idle_rate(5, 0)


def test_instr_takes_the_last_dump(tmp_path):
    for name in ("callgrind.out.77", "callgrind.out.77.1", "callgrind.out.77.2", "callgrind.out.78.9"):
        (tmp_path / name).write_text("x")
    assert instr.latest_dump(tmp_path, 77).name == "callgrind.out.77.2"


def test_instr_differences_and_what_each_row_is_read_against(tmp_path):
    """Over no filter: the scenario's own no-filter variant, else the baseline's; over the floor:
    the scenario's probe variant; compared with: `compare_to`, else its native variant."""
    scen = tmp_path / "scen"
    scen.mkdir()
    (scen / "scenarios.yaml").write_text("""
scenarios:
- id: withfloor
  title: a filter, its native peer and the wasm floor; no no-filter variant
  variants:
  - {name: ours, kind: tollgate, filters: [{module: probe, config: {}}]}
  - {name: theirs, kind: native, http_filters: []}
  - {name: floor, kind: floor, filters: [{module: probe, config: {}}]}
- id: ownnone
  title: its own no-filter variant, and a compare_to
  variants:
  - {name: a, kind: tollgate, compare_to: b, filters: [{module: probe, config: {}}]}
  - {name: b, kind: tollgate, filters: [{module: probe, config: {}}]}
  - {name: native, kind: native, http_filters: []}
  - {name: nothing, kind: none}
""")
    scenarios, problems = instr.bench.discover(None, [str(scen)])
    assert not problems
    measured = {
        "baseline/no filter": {"instructions": 140_000.0},
        "baseline/probe wasm {}": {"instructions": 158_000.0},
        "withfloor/ours": {"instructions": 210_000.0, "requests": 1000, "statuses": {"200": 1000},
                           "idle_subtracted": 2_500.0, "seconds": 41.2},
        "withfloor/theirs": {"instructions": 150_000.0},
        "withfloor/floor": {"instructions": 160_000.0},
        "ownnone/a": {"instructions": 212_400.0},
        "ownnone/b": {"instructions": 211_200.0},
        "ownnone/native": {"failure": "failed: warm-up"},
        "ownnone/nothing": {"instructions": 145_000.0},
    }
    rows = {r["key"]: r for r in instr.compare(scenarios, measured)}
    ours = rows["withfloor/ours"]
    assert ours["no_filter"] == "baseline/no filter" and ours["over_no_filter"] == pytest.approx(70_000)
    assert ours["floor"] == "withfloor/floor" and ours["over_floor"] == pytest.approx(50_000)
    assert ours["peer"] == "withfloor/theirs" and ours["over_peer"] == pytest.approx(60_000)
    assert ours["ratio"] == pytest.approx(1.4)
    # the floor is read against no filter and its native peer, not against itself
    assert rows["withfloor/floor"]["over_floor"] is None
    assert rows["withfloor/floor"]["over_no_filter"] == pytest.approx(20_000)
    a = rows["ownnone/a"]
    assert a["no_filter"] == "ownnone/nothing" and a["over_no_filter"] == pytest.approx(67_400)
    assert a["floor"] is None and a["over_floor"] is None
    assert a["peer"] == "ownnone/b" and a["over_peer"] == pytest.approx(1_200)
    # b's peer is the native variant, which failed: no comparison rather than a wrong one
    assert rows["ownnone/b"]["peer"] is None and rows["ownnone/b"]["ratio"] is None
    assert rows["ownnone/nothing"]["over_no_filter"] is None
    assert rows["baseline/no filter"]["over_floor"] is None  # no filter is not read against the floor
    assert rows["ownnone/native"]["failure"] == "failed: warm-up"

    machine = {"commit": "abc1234", "dirty": False, "cpus": 2, "cpu_model": "cpu", "memory": "4 GiB",
               "kernel": "6", "os": "Debian", "envoy": "1.40.0", "loadavg": "1.0"}
    import datetime as dt
    info = {"started": dt.datetime(2026, 12, 3, 19, 0), "valgrind": "valgrind-3.19.0", "requests": 1000,
            "warmup": 400, "idle": 20, "command": ".venv/bin/python bench/instr.py", "machine": machine}
    md, data = instr.render(scenarios, measured, info, {"withfloor": ["ours", "theirs", "floor"]})
    assert "| ours | 210.0k | +70.0k | +50.0k | theirs | +60.0k | 1.40× | 2.5k (41 s) | 200×1000 |" in md
    assert "| a | 212.4k | +67.4k | – | b | +1.2k | 1.01× | – |" in md
    assert "| native | failed: warm-up |" in md
    assert "Reproduce: `.venv/bin/python bench/instr.py --only withfloor`" in md
    assert "--only ownnone/a --only ownnone/b" in md
    saved = {r["key"]: r for r in json.loads(json.dumps(data))["rows"]}
    assert saved["withfloor/ours"]["over_floor"] == pytest.approx(50_000)


def test_instr_runs_envoy_itself_under_valgrind_not_its_python_launcher():
    from harness import envoy_binary
    with open(instr.native_envoy(envoy_binary()), "rb") as f:
        assert f.read(4) == b"\x7fELF"


def test_summary_gives_the_paired_p50_difference_of_compare_to_rows(tmp_path):
    """The median of the round-by-round p50 differences (not the difference of the medians), for
    a row whose variant names its peer; rows compared with a native filter get none."""
    import types
    scen = tmp_path / "scen"
    scen.mkdir()
    (scen / "scenarios.yaml").write_text("""
scenarios:
- id: two
  title: a global limit beside the same limit kept locally
  variants:
  - {name: global, kind: tollgate, compare_to: local, filters: [{module: probe, config: {}}]}
  - {name: local, kind: tollgate, filters: [{module: probe, config: {}}]}
  - {name: native, kind: native, http_filters: []}
""")
    scenarios, _ = instr.bench.discover(["two"], [str(scen)])
    samples = {
        "global": {"cpu_us": [100.0, 104.0, 102.0], "p50_ms": [1.10, 1.30, 1.20]},
        "local": {"cpu_us": [98.0, 101.0, 99.0], "p50_ms": [1.00, 1.25, 1.05]},
        "native": {"cpu_us": [90.0, 91.0, 92.0], "p50_ms": [0.90, 0.95, 1.00]},
    }
    two = next(sc for sc in scenarios if sc.id == "two")
    for v in two.variants:
        v.samples = {k: list(x) for k, x in samples[v.name].items()}
    fake = types.SimpleNamespace(prof=instr.bench.PROFILES["quick"], scenarios=[two], variants=two.variants,
                                 cores=instr.bench.Cores(), started=instr.bench.dt.datetime(2026, 12, 3),
                                 memory={}, problems=[])
    md, _ = instr.bench.render(fake)
    assert "paired p50 difference ms" in md
    # p50 differences per round: +0.10, +0.05, +0.15 -> median +0.100 (the medians' difference is +0.15)
    assert "| two | global | local | 102.0 | 99.0 | **+3.0** | +3.0 | +0.100 | 1.03× | – |" in md
    assert "| two | local | native | 99.0 | 91.0 | **+8.0** | +8.0 | – | 1.09× | – |" in md
