#!/usr/bin/env python3
"""Tollgate benchmarks: every filter beside Envoy's native equivalent and beside no filter.

    make bench                                # full run, writes bench/results/latest.md (+ .json)
    make bench-quick                          # every scenario briefly (CI: it asserts no timings)
    .venv/bin/python bench/bench.py --only auth-jwt-es256 --rounds 3

Method (docs/benchmarks.md): each variant runs in its own gateway Envoy (`--concurrency 1`,
pinned with taskset to core 1); the upstream Envoy (direct_response), the demo services and the
load generator share core 0. Per variant and round: a warm-up (also a sanity check of the answers),
CPU per operation from /proc/PID/task/*/schedstat around a fixed number of operations, latency
p50/p99 at a fixed open-loop rate, throughput at saturation. Variants are interleaved inside each
round (order reversed every other round); medians over rounds are reported with min-max.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(ROOT / "tests"))

import harness  # noqa: E402  (tests/harness.py: module paths, demo services, small HTTP client)

try:
    import yaml  # PyYAML is in requirements.txt
except ImportError:  # pragma: no cover
    yaml = None

LOADGEN = BENCH / "loadgen" / "target" / "release" / "tollgate-loadgen"
SCENARIOS = BENCH / "scenarios"
RESULTS = BENCH / "results"


# ---------------------------------------------------------------------------------------------
# Profiles


@dataclass
class Profile:
    name: str
    rounds: int
    warmup_seconds: float
    cpu_ops: int  # at most this many operations for the CPU measurement ...
    cpu_seconds: float  # ... and about this long at the rate the warm-up reached
    cpu_conns: int
    latency_seconds: float
    latency_conns: int
    saturation_seconds: float
    saturation_conns: int
    memory_keys: int
    memory_seconds: float = 240  # ... or as many as this allows


PROFILES = {
    "full": Profile("full", rounds=3, warmup_seconds=0.5, cpu_ops=20000, cpu_seconds=2.0, cpu_conns=8,
                    latency_seconds=3, latency_conns=32, saturation_seconds=2, saturation_conns=32,
                    memory_keys=1_000_000, memory_seconds=180),
    "quick": Profile("quick", rounds=1, warmup_seconds=0.3, cpu_ops=300, cpu_seconds=0.5, cpu_conns=4,
                     latency_seconds=0.5, latency_conns=8, saturation_seconds=0.5, saturation_conns=8,
                     memory_keys=2000),
}

DEFAULT_RATE = 500


# ---------------------------------------------------------------------------------------------
# Scenarios


@dataclass
class Load:
    reqs: list[tuple[str, str]]
    headers: list[tuple[str, str]]
    body: str | None = None

    def args(self) -> list[str]:
        out = []
        for m, p in self.reqs:
            out += ["--req", f"{m} {p}"]
        for k, v in self.headers:
            out += ["-H", f"{k}: {v}"]
        if self.body is not None:
            out += ["--body", self.body]
        return out


@dataclass
class Variant:
    scenario: "Scenario"
    name: str
    kind: str
    http_filters: list[dict]
    load: Load
    expect: set[int]
    require: set[int]
    routes: list[dict] | None
    clusters: list[dict]
    modules: list[str]
    skip: str | None = None
    compare_to: str | None = None
    rls_limits: Path | None = None  # a rate limit service (Redis + tollgate-rls) with these limits
    gateway: "Gateway | None" = None
    samples: dict[str, list[float]] = field(default_factory=dict)
    failure: str | None = None
    stats: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.scenario.id}/{self.name}"


@dataclass
class Scenario:
    id: str
    title: str
    source: str
    latency_rate: float
    capacity: float | None = None  # slowest variant's warm-up rate (calibration)
    rate_used: float | None = None
    variants: list[Variant] = field(default_factory=list)


def load_file(path: Path):
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        if yaml is None:
            raise RuntimeError(f"{path}: PyYAML is not installed")
        return yaml.safe_load(text)
    return json.loads(text)


def parse_load(spec: dict | None) -> Load:
    spec = spec or {}
    headers = spec.get("headers") or {}
    if isinstance(headers, dict):
        headers = list(headers.items())
    headers = [(str(k), str(v)) for k, v in headers]
    seq = spec.get("sequence")
    if seq:
        reqs = [(s.get("method", "GET"), s.get("path", "/bench")) for s in seq]
    else:
        reqs = [(spec.get("method", "GET"), spec.get("path", "/bench"))]
    return Load(reqs, headers, spec.get("body"))


def tollgate_entry(module: str, config, name: str | None = None) -> dict:
    entry = harness.single_filter(module, config)
    if name:
        entry["name"] = name
    return entry


def filter_config(f: dict, folder: Path):
    """A filter's (or a section's) configuration: `config`, or `config_file` (JSON as written)."""
    config = f.get("config")
    if config is None and f.get("config_file"):
        cfg_path = folder / f["config_file"]
        config = cfg_path.read_text() if cfg_path.suffix == ".json" else load_file(cfg_path)
    return config if config is not None else {}


def parse_variant(sc: Scenario, base: dict, v: dict, folder: Path) -> Variant:
    modules = list(base.get("modules") or []) + list(v.get("modules") or [])
    chain: list[dict] = []
    for f in v.get("filters") or []:
        module = f["module"]
        modules.append(module)
        if module == harness.COMBINED_MODULE:
            # The combined module: `sections: {auth: {config_file: ...}, ratelimit: {...}, ...}`.
            sections = [(n, filter_config(spec, folder)) for n, spec in (f.get("sections") or {}).items()]
            chain.append(harness.combined_filter(sections))
            continue
        chain.append(tollgate_entry(module, filter_config(f, folder)))
    raw = v.get("http_filters")
    if raw is None and v.get("http_filters_file"):
        raw = load_file(folder / v["http_filters_file"])
        if isinstance(raw, dict):
            raw = raw.get("http_filters", [raw])
    chain += list(raw or [])
    req = v.get("request", base.get("request"))
    return Variant(
        scenario=sc,
        name=str(v.get("name", v.get("kind", "variant"))),
        kind=str(v.get("kind", "tollgate")),
        http_filters=chain,
        load=parse_load(req),
        expect=set(v.get("expect_status", base.get("expect_status", [200]))),
        require=set(v.get("require_status", base.get("require_status", []))),
        routes=v.get("routes", base.get("routes")),
        clusters=list(base.get("clusters") or []) + list(v.get("clusters") or []),
        modules=sorted(set(modules)),
        skip=v.get("skip"),
        compare_to=v.get("compare_to"),
        rls_limits=folder / base["rls_limits"] if base.get("rls_limits") else None,
    )


def builtin_scenarios() -> list[Scenario]:
    """The two floors every comparison is read against."""
    sc = Scenario("baseline", "Baselines: no filter, and the trivial wasm filter (wasm runtime floor)",
                  "bench/bench.py", DEFAULT_RATE)
    none = {"name": "no filter", "kind": "none"}
    floor = {"name": "probe wasm {}", "kind": "floor", "filters": [{"module": "probe", "config": {}}]}
    sc.variants = [parse_variant(sc, {}, none, BENCH), parse_variant(sc, {}, floor, BENCH)]
    return [sc]


def scenario_folders(extra_dirs: list[str] | None = None) -> list[Path]:
    """bench/scenarios/* (filters' own folders first, extra/ last), or only the folders given."""
    if extra_dirs:
        return [Path(d).resolve() for d in extra_dirs]
    folders = sorted(p for p in SCENARIOS.iterdir() if p.is_dir()) if SCENARIOS.exists() else []
    folders.sort(key=lambda p: p.name == "extra")
    return folders


def rel(p: Path) -> str:
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def discover(only: list[str] | None, dirs: list[str] | None = None) -> tuple[list[Scenario], list[str]]:
    """Scenarios from bench/scenarios/*/scenarios.{yaml,yml,json}; problems are reported, not fatal.
    A scenario id defined twice is taken from the first folder (a filter's own before extra/)."""
    scenarios = builtin_scenarios()
    problems = []
    seen = {s.id for s in scenarios}
    folders = scenario_folders(dirs)
    for folder in folders:
        files = [folder / n for n in ("scenarios.yaml", "scenarios.yml", "scenarios.json") if (folder / n).exists()]
        if not files:
            problems.append(f"{rel(folder)}/: no scenarios.yaml (see bench/scenarios/README.md)")
            continue
        try:
            doc = load_file(files[0])
            for spec in doc.get("scenarios", []):
                sid = spec["id"]
                if sid in seen:
                    continue
                sc = Scenario(sid, spec.get("title", sid), rel(files[0]),
                              float(spec.get("latency_rate", DEFAULT_RATE)))
                sc.variants = [parse_variant(sc, spec, v, folder) for v in spec.get("variants", [])]
                if spec.get("skip"):
                    for v in sc.variants:
                        v.skip = str(spec["skip"])
                seen.add(sid)
                scenarios.append(sc)
        except Exception as exc:  # noqa: BLE001 - a broken scenario file must not stop the others
            problems.append(f"{rel(files[0])}: {type(exc).__name__}: {exc}")
    order = ("baseline", "auth", "ratelimit", "cache", "aggregate", "chain")
    scenarios.sort(key=lambda sc: next((i for i, p in enumerate(order) if sc.id.startswith(p)), len(order)))
    if only:
        def wanted(v: Variant) -> bool:
            return any(v.scenario.id == o or v.key == o or v.scenario.id.startswith(o.rstrip("*"))
                       and o.endswith("*") for o in only)
        for sc in scenarios:
            sc.variants = [v for v in sc.variants if wanted(v) or (sc.id == "baseline" and v.kind == "none")]
        scenarios = [sc for sc in scenarios if sc.variants]
    for sc in scenarios:
        for v in sc.variants:
            if v.skip:
                continue
            missing = [m for m in v.modules if not harness.module_path(m).exists()]
            if missing:
                v.skip = "n/a: not built: " + ", ".join(f"build/tollgate_{m}.wasm" for m in missing)
    return scenarios, problems


# ---------------------------------------------------------------------------------------------
# Processes


def cpu_ids() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return list(range(os.cpu_count() or 1))


class Cores:
    """Core for the gateway(s) and core for everything else."""

    def __init__(self):
        ids = cpu_ids()
        self.pinned = len(ids) >= 2 and shutil.which("taskset") is not None
        self.gateway = ids[-1] if self.pinned else None
        self.others = ",".join(str(i) for i in ids[:-1]) if self.pinned else None

    def prefix(self, gateway: bool) -> list[str]:
        """The command that pins a process to its cores (none when not pinned)."""
        if not self.pinned:
            return []
        return ["taskset", "-c", str(self.gateway if gateway else self.others)]


def circuit_breakers() -> dict:
    big = 1_000_000_000
    return {"thresholds": [{"priority": "DEFAULT", "max_connections": big, "max_pending_requests": big,
                            "max_requests": big, "max_retries": big}]}


def cluster(name: str, port: int) -> dict:
    c = harness.static_cluster(name, port)
    c["circuit_breakers"] = circuit_breakers()
    return c


def bootstrap(port: int, admin_port: int, routes: list[dict], http_filters: list[dict],
              clusters: list[dict]) -> dict:
    """The harness's bootstrap (tests/harness.py), lean: no request ids, no dynamic router stats."""
    return harness.bootstrap(port, admin_port, http_filters, clusters, routes, name="bench", lean=True)


UPSTREAM_BODY = json.dumps({"id": 1, "name": "bench", "items": [1, 2, 3], "ok": True})


def upstream_routes() -> list[dict]:
    def direct(prefix: str, cache_control: str | None) -> dict:
        headers = [{"header": {"key": "content-type", "value": "application/json"}}]
        if cache_control:
            headers.append({"header": {"key": "cache-control", "value": cache_control}})
        return {"match": {"prefix": prefix},
                "direct_response": {"status": 200, "body": {"inline_string": UPSTREAM_BODY}},
                "response_headers_to_add": headers}
    return [direct("/cacheable", "public, max-age=86400"), direct("/nostore", "no-store"), direct("/", None)]


def gateway_routes(extra: list[dict] | None) -> list[dict]:
    if extra is not None:
        return extra
    routes = [
        {"match": {"prefix": f"/api/{s}"}, "route": {"cluster": s, "prefix_rewrite": f"/{s}", "timeout": "30s"}}
        for s in harness.SERVICES
    ]
    routes.append({"match": {"prefix": "/"}, "route": {"cluster": "upstream", "timeout": "30s"}})
    return routes


class EnvoyProc:
    """The harness's Envoy (tests/harness.py: process, bootstrap, readiness, stats), pinned to its
    cores, with the benchmark's measurements of its process."""

    def __init__(self, name: str, config: dict, cores: Cores, gateway: bool, workdir: Path):
        self.name = name
        self.envoy = harness.Envoy.launch(
            config, concurrency=1, log_level="warning", argv_prefix=cores.prefix(gateway),
            workdir=workdir / name.replace("/", "_").replace(" ", "_"))
        self.port = self.envoy.port
        self.admin_port = self.envoy.admin_port
        self.log_path = self.envoy.log_path

    def wait_ready(self, timeout: float = 60.0) -> str | None:
        """None when ready, else why not (Envoy is stopped then)."""
        try:
            self.envoy.wait_ready(timeout)
            return None
        except TimeoutError:
            return "Envoy did not become ready in time"
        except RuntimeError:
            return f"Envoy exited with {self.envoy.returncode}: {self.log_excerpt()}"

    def log_excerpt(self) -> str:
        lines = self.envoy.log().splitlines()
        interesting = [ln for ln in lines if "error" in ln.lower() or "critical" in ln.lower()
                       or "invalid" in ln.lower()]
        return " | ".join((interesting or lines)[-3:])[:400]

    @property
    def pid(self) -> int:
        return self.envoy.proc.pid

    def cpu_ns(self) -> int:
        total = 0
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                pass
        return total

    def tollgate_stats(self) -> dict[str, int]:
        """The gateway's Tollgate metrics (`wasmcustom.tollgate.*`): evidence the filters did their work."""
        try:
            stats = self.envoy.stats("wasmcustom.tollgate")
        except OSError:
            return {}
        return {name.removeprefix("wasmcustom."): v for name, v in stats.items()}

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def stop(self):
        self.envoy.stop()


class Gateway(EnvoyProc):
    pass


def loadgen(port: int, load: Load, cores: Cores, *, ops: int | None = None, rate: float | None = None,
            duration: float | None = None, conns: int = 8, start: int = 0, timeout: float = 30) -> dict:
    argv = [str(LOADGEN), "--addr", f"127.0.0.1:{port}", "-c", str(conns), "--start", str(start)] + load.args()
    if ops is not None:
        argv += ["--ops", str(ops)]
    if rate is not None:
        argv += ["--rate", str(rate)]
    if duration is not None:
        argv += ["--duration", str(duration)]
    out = subprocess.run(cores.prefix(gateway=False) + argv, capture_output=True, text=True,
                         timeout=timeout + (duration or 0) + (ops or 0) / 200)
    if out.returncode != 0:
        raise RuntimeError(f"loadgen failed ({out.returncode}): {out.stderr.strip()}")
    return json.loads(out.stdout)


def loadgen_command(v: Variant, mode: str, prof: Profile) -> str:
    """The load generator command line of one measurement (the gateway port is shown as $PORT)."""
    argv = ["bench/loadgen/target/release/tollgate-loadgen", "--addr", "127.0.0.1:$PORT"] + v.load.args()
    if mode == "cpu":
        ops = int(statistics.median(v.samples["cpu_ops"])) if v.samples.get("cpu_ops") else prof.cpu_ops
        argv += ["-c", str(prof.cpu_conns), "--ops", str(ops)]
    elif mode == "latency":
        argv += ["-c", str(prof.latency_conns), "--rate", f"{v.scenario.rate_used or v.scenario.latency_rate:g}",
                 "--duration", str(prof.latency_seconds)]
    else:
        argv += ["-c", str(prof.saturation_conns), "--duration", str(prof.saturation_seconds)]
    return " ".join(shlex.quote(a) if a != "127.0.0.1:$PORT" else a for a in argv)


# ---------------------------------------------------------------------------------------------
# Measurement


class Bench:
    def __init__(self, prof: Profile, scenarios: list[Scenario], problems: list[str], args):
        self.prof = prof
        self.scenarios = scenarios
        self.problems = problems
        self.args = args
        self.cores = Cores()
        self.workdir = Path(tempfile.mkdtemp(prefix="tollgate-bench-"))
        self.upstream: EnvoyProc | None = None
        self.services: harness.DemoServices | None = None
        self.redis: harness.Redis | None = None
        self.rls: dict[Path, harness.RateLimitService] = {}
        self.op_counter = 10_000_000  # {n} keeps increasing over the whole run: keys stay distinct
        self.memory: dict = {}
        self.started = dt.datetime.now(dt.timezone.utc)

    @property
    def variants(self) -> list[Variant]:
        return [v for sc in self.scenarios for v in sc.variants]

    # -- set-up ---------------------------------------------------------------------------------
    def start_upstreams(self):
        self.upstream, err = self.launch(
            "upstream", lambda: bootstrap(harness.free_port(), harness.free_port(), upstream_routes(), [], []),
            gateway=False)
        if err:
            raise RuntimeError(f"upstream Envoy: {err}")
        if harness.demo_binary().exists():
            self.services = harness.DemoServices.start()
            if self.cores.pinned:
                subprocess.run(["taskset", "-a", "-p", "-c", self.cores.others, str(self.services.proc.pid)],
                               capture_output=True)
        else:
            self.problems.append(f"{harness.demo_binary()} is missing: scenarios using /api/* will fail "
                                 "(cargo build --release -p tollgate-demo)")
        self.start_rate_limit_services()

    def start_rate_limit_services(self):
        """Scenarios with `rls_limits`: one redis-server, and a tollgate-rls per limits file (cluster
        `tollgate_rls`, HTTP/2), on the load generator's cores like the demo services."""
        files = sorted({v.rls_limits for v in self.variants if v.rls_limits and not v.skip})
        if not files:
            return
        try:
            self.redis = harness.Redis.start()
            for f in files:
                self.rls[f] = harness.RateLimitService.start(f.read_text(), self.redis, timeout_ms=2000)
        except Exception as exc:  # noqa: BLE001 - those scenarios fail, the others run
            for v in self.variants:
                if v.rls_limits:
                    v.skip = f"n/a: rate limit service: {exc}"
            return
        if self.cores.pinned:
            for pid in [self.redis.proc.pid] + [r.proc.pid for r in self.rls.values()]:
                subprocess.run(["taskset", "-a", "-p", "-c", self.cores.others, str(pid)], capture_output=True)

    def launch(self, name: str, make_config, gateway: bool = True) -> tuple[EnvoyProc, str | None]:
        """Start one Envoy and wait for it; retried on a port taken meanwhile. (proc, error or None)"""
        for _ in range(4):
            p = EnvoyProc(name, make_config(), self.cores, gateway=gateway, workdir=self.workdir)
            err = p.wait_ready()
            if err and "already in use" in err:
                p.stop()
                continue
            if err:
                p.stop()
            return p, err
        return p, err

    def clusters(self, extra: list[dict]) -> list[dict]:
        out = [cluster("upstream", self.upstream.port)]
        if self.services:
            out += [cluster(n, p) for n, p in self.services.ports.items()]
        for c in extra:  # the scenario's own clusters get the same tuning
            c.setdefault("circuit_breakers", circuit_breakers())
        return out + extra

    def gateway_config(self, v: Variant) -> dict:
        extra = list(v.clusters)
        if v.rls_limits in self.rls:
            extra.append(harness.grpc_cluster("tollgate_rls", self.rls[v.rls_limits].port))
        return bootstrap(harness.free_port(), harness.free_port(), gateway_routes(v.routes), v.http_filters,
                         self.clusters(extra))

    def start_gateways(self, variants: list[Variant]):
        pending = []
        for v in variants:
            if v.skip:
                continue
            v.gateway = Gateway(v.key, self.gateway_config(v), self.cores, gateway=True, workdir=self.workdir)
            pending.append(v)
        for v in pending:
            err = v.gateway.wait_ready()
            for _ in range(3):
                # a free port found by bind-and-close can be taken by someone else before Envoy binds it
                if not err or "already in use" not in err:
                    break
                v.gateway.stop()
                v.gateway = Gateway(v.key, self.gateway_config(v), self.cores, gateway=True, workdir=self.workdir)
                err = v.gateway.wait_ready()
            if err:
                v.skip = f"n/a: gateway refused: {err}"
                v.gateway.stop()
                v.gateway = None

    def stop_all(self):
        for v in self.variants:
            if v.gateway:
                v.gateway.stop()
        if self.upstream:
            self.upstream.stop()
        if self.services:
            self.services.stop()
        for r in self.rls.values():
            r.stop()
        if self.redis:
            self.redis.stop()

    def next_start(self, n: int) -> int:
        s = self.op_counter
        self.op_counter += n + 1000
        return s

    # -- one variant, one round -----------------------------------------------------------------
    def warmup(self, v: Variant, gateway: "EnvoyProc | None" = None) -> dict:
        """Closed loop for a moment: warms the gateway up and checks its answers."""
        prof = self.prof
        g = gateway or v.gateway
        r = loadgen(g.port, v.load, self.cores, duration=prof.warmup_seconds, conns=prof.cpu_conns,
                    start=self.next_start(int(100_000 * prof.warmup_seconds)))
        statuses = {int(k): c for k, c in r["statuses"].items()}
        bad = {k: c for k, c in statuses.items() if k not in v.expect}
        if r["errors"] or bad:
            raise RuntimeError(f"warm-up: statuses {statuses}, errors {r['errors']} {r['error_kinds']} "
                               f"(expected {sorted(v.expect)})")
        missing = [s for s in v.require if s not in statuses]
        if missing:
            raise RuntimeError(f"warm-up: never saw status {missing} (got {statuses})")
        if not r["ops"]:
            raise RuntimeError("warm-up: no operation completed")
        return r

    def check(self, v: Variant, r: dict, what: str):
        statuses = {int(k): c for k, c in r["statuses"].items()}
        bad = {k: c for k, c in statuses.items() if k not in v.expect}
        if bad or r["errors"]:
            raise RuntimeError(f"{what}: unexpected statuses {bad}, errors {r['errors']} {r['error_kinds']}")

    def measure(self, v: Variant):
        prof = self.prof
        g = v.gateway
        warm = self.warmup(v)
        # CPU per operation: the gateway's CPU time over a fixed number of operations (sized from the
        # warm-up's rate so that slow scenarios, e.g. with upstream delays, take cpu_seconds too)
        ops = int(min(prof.cpu_ops, max(100, warm["ops_per_s"] * prof.cpu_seconds)))
        v.samples.setdefault("cpu_ops", []).append(ops)
        before = g.cpu_ns()
        r = loadgen(g.port, v.load, self.cores, ops=ops, conns=prof.cpu_conns, start=self.next_start(ops))
        after = g.cpu_ns()
        self.check(v, r, "cpu run")
        ops = max(1, r["ops"])
        v.samples.setdefault("cpu_us", []).append((after - before) / 1000 / ops)
        # latency at a fixed, moderate rate (open loop)
        rate = v.scenario.rate_used or v.scenario.latency_rate
        n = int(rate * prof.latency_seconds)
        r = loadgen(g.port, v.load, self.cores, rate=rate, duration=prof.latency_seconds,
                    conns=prof.latency_conns, start=self.next_start(n))
        self.check(v, r, "latency run")
        v.samples.setdefault("p50_ms", []).append(r["latency_us"]["p50"] / 1000)
        v.samples.setdefault("p99_ms", []).append(r["latency_us"]["p99"] / 1000)
        # throughput at saturation (closed loop), and how busy the gateway's core was
        before, t0 = g.cpu_ns(), time.monotonic()
        r = loadgen(g.port, v.load, self.cores, duration=prof.saturation_seconds, conns=prof.saturation_conns,
                    start=self.next_start(int(200_000 * prof.saturation_seconds)))
        busy = (g.cpu_ns() - before) / 1e9 / max(1e-9, time.monotonic() - t0)
        self.check(v, r, "saturation run")
        v.samples.setdefault("rps", []).append(r["ops_per_s"])
        v.samples.setdefault("busy", []).append(busy * 100)

    def run(self):
        self.start_upstreams()
        active = [v for v in self.variants if not v.skip]
        log(f"starting {len(active)} gateway Envoys (one per variant), pinned to core {self.cores.gateway}")
        self.start_gateways(active)
        self.calibrate()
        for rnd in range(self.prof.rounds):
            order = [v for v in self.variants if v.gateway and not v.failure]
            if rnd % 2 == 1:
                order.reverse()
            log(f"round {rnd + 1}/{self.prof.rounds}: {len(order)} variants")
            for v in order:
                try:
                    self.measure(v)
                    s = v.samples
                    log(f"  {v.key:<48} cpu {s['cpu_us'][-1]:8.1f} us/op  p50 {s['p50_ms'][-1]:7.2f} ms  "
                        f"p99 {s['p99_ms'][-1]:7.2f} ms  {s['rps'][-1]:9.0f} op/s  (core {s['busy'][-1]:.0f}% busy)")
                except Exception as exc:  # noqa: BLE001 - one variant failing must not stop the run
                    v.failure = f"failed: {exc}"
                    log(f"  {v.key:<48} {v.failure}")
        for v in self.variants:
            if v.gateway:
                v.stats = v.gateway.tollgate_stats()
                v.gateway.stop()
        if not self.args.no_memory:
            self.measure_memory()

    def calibrate(self):
        """Latency is measured at a moderate rate: the scenario's, lowered to half of what its
        slowest variant managed in a closed-loop warm-up, so that no variant is measured overloaded
        (the same rate for every variant of a scenario)."""
        for sc in self.scenarios:
            caps = []
            for v in sc.variants:
                if not v.gateway or v.failure:
                    continue
                try:
                    caps.append(self.warmup(v)["ops_per_s"])
                except Exception as exc:  # noqa: BLE001
                    v.failure = f"failed: {exc}"
                    log(f"  {v.key:<48} {v.failure}")
            if caps:
                sc.capacity = min(caps)
                sc.rate_used = max(1.0, min(sc.latency_rate, round(sc.capacity / 2)))
                if sc.rate_used < sc.latency_rate:
                    log(f"  {sc.id}: latency rate lowered to {sc.rate_used:g} op/s (slowest variant: "
                        f"{sc.capacity:.0f} op/s)")

    # -- memory ---------------------------------------------------------------------------------
    def measure_memory(self):
        """RSS of a gateway with the filters loaded, idle and after many distinct keys/URLs."""
        spec = memory_spec(self.args.scenarios)
        if spec is None:
            self.memory = {"skip": "n/a: no `memory` section in bench/scenarios/*/scenarios.yaml"}
            return
        keys = self.args.memory_keys or self.prof.memory_keys
        try:
            none, err = self.launch("memory-none", lambda: self.gateway_config(spec["none"]))
            time.sleep(1)
            rss_none = none.rss_kib() if not err else None
            none.stop()
            idle = []
            for iv in spec["idle"]:
                if iv.skip:
                    idle.append({"name": iv.name, "skip": iv.skip})
                    continue
                ig, err = self.launch(f"memory-idle-{len(idle)}", lambda iv=iv: self.gateway_config(iv))
                if err:
                    idle.append({"name": iv.name, "skip": f"n/a: gateway refused: {err}"})
                    continue
                try:
                    self.warmup(iv, ig)
                    time.sleep(1)
                    idle.append({"name": iv.name, "rss_kib": ig.rss_kib(),
                                 "filters": [f["name"] for f in iv.http_filters]})
                except Exception as exc:  # noqa: BLE001
                    idle.append({"name": iv.name, "skip": f"failed: {exc}"})
                finally:
                    ig.stop()
            v = spec["loaded"]
            if v.skip:
                self.memory = {"skip": v.skip, "rss_none_kib": rss_none, "idle": idle}
                return
            g, err = self.launch("memory-loaded", lambda: self.gateway_config(v))
            if err:
                self.memory = {"skip": f"n/a: gateway refused: {err}", "rss_none_kib": rss_none, "idle": idle}
                return
            try:
                self.warmup(v, g)
                rss_loaded = g.rss_kib()
                t0 = time.monotonic()
                r = loadgen(g.port, v.load, self.cores, ops=keys, conns=self.prof.saturation_conns,
                            duration=self.args.memory_seconds or self.prof.memory_seconds,
                            start=self.next_start(keys), timeout=1800)
                took = time.monotonic() - t0
                time.sleep(1)
                rss_after = g.rss_kib()
                stats = {k: c for k, c in g.tollgate_stats().items() if c}
                self.memory = {
                    "title": spec["title"], "source": spec["source"], "keys": keys, "seconds": took, "keys_sent": r["ops"],
                    "statuses": r["statuses"], "errors": r["errors"], "rss_none_kib": rss_none,
                    "rss_loaded_kib": rss_loaded, "rss_after_kib": rss_after,
                    "filters": [f["name"] for f in v.http_filters], "stats": stats, "idle": idle,
                    "note": spec.get("note"),
                }
            finally:
                g.stop()
        except Exception as exc:  # noqa: BLE001
            self.memory = {"skip": f"failed: {exc}"}


def memory_spec(dirs: list[str] | None = None):
    """The `memory` section of a scenarios file: the chain to load and the request sending distinct keys."""
    for folder in scenario_folders(dirs):
        for n in ("scenarios.yaml", "scenarios.yml", "scenarios.json"):
            f = folder / n
            if not f.exists():
                continue
            try:
                doc = load_file(f)
            except Exception:  # noqa: BLE001 - reported by discover()
                continue
            spec = doc.get("memory")
            if not spec:
                continue
            sc = Scenario("memory", spec.get("title", "memory"), rel(f), DEFAULT_RATE)
            loaded = parse_variant(sc, spec, {"name": "loaded", "kind": "tollgate",
                                              "filters": spec.get("filters", [])}, folder)
            missing = [m for m in loaded.modules if not harness.module_path(m).exists()]
            if missing:
                loaded.skip = "n/a: not built: " + ", ".join(missing)
            none = parse_variant(sc, {}, {"name": "none", "kind": "none"}, folder)
            idle = []
            for i in spec.get("idle", []):
                iv = parse_variant(sc, spec, {"kind": "tollgate", **i}, folder)
                missing = [m for m in iv.modules if not harness.module_path(m).exists()]
                if missing:
                    iv.skip = "n/a: not built: " + ", ".join(missing)
                idle.append(iv)
            return {"title": sc.title, "source": sc.source, "loaded": loaded, "none": none, "idle": idle,
                    "note": spec.get("note")}
    return None


# ---------------------------------------------------------------------------------------------
# Report


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)


def sh(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def machine() -> dict:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    envoy_version = sh([harness.envoy_binary(), "--version"]).split("version:")[-1].strip()
    return {
        "cpus": os.cpu_count(), "cpu_model": model, "memory": mem, "kernel": platform.release(),
        "os": sh(["sh", "-c", ". /etc/os-release 2>/dev/null && echo \"$PRETTY_NAME\""]),
        "envoy": envoy_version, "loadavg": sh(["cat", "/proc/loadavg"]),
        "commit": sh(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
        "dirty": bool(sh(["git", "-C", str(ROOT), "status", "--porcelain", "--", "filters", "bench"])),
    }


def med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def paired(a: list[float], b: list[float]) -> float | None:
    """The median over rounds of a − b, round by round (variants are interleaved inside a round, so
    a slow round slows both: the pairs cancel the drift that medians taken apart keep). Falls back
    to the difference of the medians when a variant missed a round."""
    if not a or not b:
        return None
    if len(a) == len(b):
        return statistics.median(x - y for x, y in zip(a, b))
    return statistics.median(a) - statistics.median(b)


def fmt_spread(xs: list[float], digits: int) -> str:
    if not xs:
        return "–"
    m = statistics.median(xs)
    if len(xs) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ({min(xs):.{digits}f}–{max(xs):.{digits}f})"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b <= 0:
        return "–"
    return f"{a / b:.2f}×"


REFERENCE_KINDS = ("native", "client")


def peer(sc: Scenario, v: Variant) -> Variant | None:
    """What a Tollgate variant is compared with: `compare_to`, else the scenario's first native
    (or client-side) variant. Only Tollgate variants (and the wasm floor) have one."""
    if v.kind not in ("tollgate", "floor"):
        return None
    if v.compare_to:
        return next((r for r in sc.variants if r.name == v.compare_to), None)
    return next((r for r in sc.variants if r.kind in REFERENCE_KINDS), None)


def reference(sc: Scenario, v: Variant) -> Variant | None:
    """`peer`, when it was measured (bench/instr.py uses `peer` with its own measurements)."""
    ref = peer(sc, v)
    return ref if ref is not None and ref.samples.get("cpu_us") else None


def render(bench: Bench) -> tuple[str, dict]:
    prof = bench.prof
    m = machine()
    none = next((v for v in bench.variants if v.scenario.id == "baseline" and v.kind == "none"), None)
    none_cpu = med(none.samples.get("cpu_us", [])) if none else None
    floor = next((v for v in bench.variants if v.kind == "floor"), None)
    floor_cpu = med(floor.samples.get("cpu_us", [])) if floor else None
    argv = " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [
        f"# Tollgate benchmark results ({prof.name})",
        "",
        f"Run {bench.started:%Y-%m-%d %H:%M} UTC, commit `{m['commit']}`{' (with uncommitted changes)' if m['dirty'] else ''}, "
        f"command `.venv/bin/python bench/bench.py {argv}`.".replace(" `.venv/bin/python bench/bench.py `", " `.venv/bin/python bench/bench.py`"),
        "",
        "Machine: " + f"{m['cpus']} CPUs ({m['cpu_model']}), {m['memory']} RAM, Linux {m['kernel']}, {m['os']}; "
        f"Envoy {m['envoy']}; load average at start {m['loadavg']}.",
        "",
        f"Method: each variant in its own gateway Envoy (`--concurrency 1`, pinned to core {bench.cores.gateway} "
        f"with taskset{'' if bench.cores.pinned else ' — NOT pinned: fewer than 2 CPUs or no taskset'}); "
        "upstream Envoy (direct_response), demo services and the load generator on the other core. "
        f"{prof.rounds} round(s), variants interleaved; each cell is the median over rounds with (min–max). "
        f"CPU: gateway CPU time (all threads, /proc schedstat) over a fixed number of operations (at most "
        f"{prof.cpu_ops}, fewer in slow scenarios: about {prof.cpu_seconds:g} s of work) on "
        f"{prof.cpu_conns} keep-alive connections, after a {prof.warmup_seconds:g} s warm-up that also checks the answers. Latency: open loop at the scenario's rate for "
        f"{prof.latency_seconds:g} s on up to {prof.latency_conns} connections, measured from when each request "
        f"was due. Throughput: closed loop, {prof.saturation_conns} connections, {prof.saturation_seconds:g} s; "
        "“core busy” is the gateway's CPU use during that run (below ~95 % the gateway was not the bottleneck). "
        "See [docs/benchmarks.md](../../docs/benchmarks.md).",
        "",
        "“× none” is CPU per operation divided by the no-filter gateway's; “× native” divides by the native "
        "Envoy filter doing the same job in the same scenario; “added µs” is CPU per operation minus the "
        "no-filter gateway's (the filter's own cost).",
        "",
    ]
    data = {"profile": prof.__dict__, "machine": m, "started": bench.started.isoformat(), "argv": sys.argv[1:],
            "scenarios": [], "memory": bench.memory, "problems": bench.problems}
    summary_at = len(lines)
    for sc in bench.scenarios:
        rate_note = f"latency at {sc.rate_used or sc.latency_rate:g} op/s"
        if sc.rate_used and sc.rate_used < sc.latency_rate:
            rate_note += (f" (lowered from {sc.latency_rate:g}: half of what the slowest variant managed, "
                          f"{sc.capacity:.0f} op/s, in a closed-loop warm-up)")
        lines += [f"## {sc.title}", "", f"`{sc.id}` from `{sc.source}`, {rate_note}.", ""]
        lines += ["| variant | CPU µs/op | added µs | × none | × native | p50 ms | p99 ms | op/s at saturation | core busy |",
                  "|---|---|---|---|---|---|---|---|---|"]
        sdata = {"id": sc.id, "title": sc.title, "source": sc.source, "latency_rate": sc.latency_rate,
                 "rate_used": sc.rate_used, "capacity": sc.capacity,
                 "variants": []}
        for v in sc.variants:
            s = v.samples
            cpu = med(s.get("cpu_us", []))
            vd = {"name": v.name, "kind": v.kind, "samples": s, "skip": v.skip, "failure": v.failure,
                  "modules": v.modules, "tollgate_stats": v.stats}
            sdata["variants"].append(vd)
            if v.skip or (v.failure and not s.get("cpu_us")):
                lines.append(f"| {v.name} | {v.skip or v.failure} | | | | | | | |")
                continue
            native = reference(sc, v)
            native_cpu = med(native.samples["cpu_us"]) if native else None
            added = f"{cpu - none_cpu:+.1f}" if cpu is not None and none_cpu is not None and v is not none else "–"
            lines.append(
                f"| {v.name}{' (⚠ ' + v.failure + ')' if v.failure else ''} | {fmt_spread(s.get('cpu_us', []), 1)} | {added} "
                f"| {ratio(cpu, none_cpu) if v is not none else '1.00×'} "
                f"| {ratio(cpu, native_cpu) if native is not None else '–'} "
                f"| {fmt_spread(s.get('p50_ms', []), 2)} | {fmt_spread(s.get('p99_ms', []), 2)} "
                f"| {fmt_spread(s.get('rps', []), 0)} | {fmt_spread(s.get('busy', []), 0)} % |")
        lines.append("")
        counters = []
        for v in sc.variants:
            shown = {k.removeprefix("tollgate."): c for k, c in v.stats.items()
                     if c and not k.endswith(".requests") and ".limit." not in k}
            if shown:
                counters.append(f"{v.name}: " + ", ".join(f"{k} {c:,}" for k, c in sorted(shown.items())))
        if counters:
            lines += ["Tollgate counters at the end of the run (evidence the filter did its job): "
                      + "; ".join(counters) + ".", ""]
        runnable = [v for v in sc.variants if not v.skip]
        if runnable:
            lines.append("<details><summary>Reproduce</summary>")
            lines.append("")
            lines.append(f"    .venv/bin/python bench/bench.py --only {sc.id} --rounds {prof.rounds}"
                         + (" --quick" if prof.name == "quick" else ""))
            lines.append("")
            lines.append("Load generator commands, per variant (the gateway Envoy's config is in the run's "
                         "work directory, printed at the end of the run):")
            lines.append("")
            for v in runnable:
                lines.append(f"- {v.name}:")
                for mode in ("cpu", "latency", "saturation"):
                    lines.append(f"  - {mode}: `{loadgen_command(v, mode, prof)}`")
            lines.append("")
            lines.append("</details>")
            lines.append("")
        data["scenarios"].append(sdata)
    # summary: every Tollgate variant beside what it is compared with
    summary = []
    for sc in bench.scenarios:
        for v in sc.variants:
            native = reference(sc, v)
            if v.kind != "tollgate" or not v.samples.get("cpu_us") or native is None:
                continue
            ncpu = med(native.samples["cpu_us"])
            cpu = med(v.samples["cpu_us"])
            diff = cpu - ncpu
            added = (f"{cpu - none_cpu:+.1f} vs {ncpu - none_cpu:+.1f}" if none_cpu is not None else "–")
            pair = paired(v.samples["cpu_us"], native.samples["cpu_us"])
            # latency: only where the variant names its peer (`compare_to`: the same filter set up
            # two ways, e.g. a global limit beside the same limit kept locally)
            p50 = paired(v.samples.get("p50_ms", []), native.samples.get("p50_ms", [])) if v.compare_to else None
            summary.append(f"| {sc.id} | {v.name} | {native.name} | {cpu:.1f} | {ncpu:.1f} | "
                           f"{'**' if diff > 0 else ''}{diff:+.1f}{'**' if diff > 0 else ''} | {pair:+.1f} "
                           f"| {'–' if p50 is None else f'{p50:+.3f}'} "
                           f"| {cpu / ncpu:.2f}× | {added} |")
    # against the wasm floor measured in the same scenario (a `floor` variant beside the filter)
    over_floor = []
    for sc in bench.scenarios:
        sfloor = next((v for v in sc.variants if v.kind == "floor" and v.samples.get("cpu_us")), None)
        if sc.id == "baseline" or sfloor is None:
            continue
        fcpu = sfloor.samples["cpu_us"]
        for v in sc.variants:
            if v.kind != "tollgate" or not v.samples.get("cpu_us"):
                continue
            pair = paired(v.samples["cpu_us"], fcpu)
            over_floor.append(f"| {sc.id} | {v.name} | {med(v.samples['cpu_us']):.1f} | {med(fcpu):.1f} "
                              f"| {pair:+.1f} | {', '.join(f'{x - y:+.1f}' for x, y in zip(v.samples['cpu_us'], fcpu))} |")
    head = []
    if summary:
        head += ["## Summary: Tollgate vs the native equivalent", "",
                 "CPU per operation of the gateway, medians (details, spread and latency in each scenario's "
                 "table below). A positive difference (in bold) is how much more the Tollgate filter costs.", "",
                 "“paired” is the median over rounds of the round-by-round difference (the two run one after "
                 "the other in each round, so a slow round slows both and the pair cancels it); it is the "
                 "steadier of the two differences on a shared machine.", "",
                 "“paired p50 difference” (rows whose variant names its peer with `compare_to`) is the same "
                 "for latency: the median over rounds of the round-by-round difference of the two p50s, in "
                 "ms (the p50s taken apart move by ±0.1 ms between rounds here).", "",
                 "| scenario | Tollgate | compared with | Tollgate µs/op | native µs/op | difference µs "
                 "| paired difference µs | paired p50 difference ms | ratio "
                 "| added over no filter: Tollgate vs native µs |",
                 "|---|---|---|---|---|---|---|---|---|---|"] + summary + [""]
    if over_floor:
        head += ["## Over the wasm floor, in the same scenario", "",
                 "The probe filter (a wasm module doing nothing: the entries into the VM every filter pays) "
                 "run as a variant of the scenario itself, interleaved with the filters; “over the floor” is "
                 "the paired difference (median over rounds of the round-by-round difference), then each "
                 "round's difference. This is the filter's own work beyond being a wasm module.", "",
                 "| scenario | Tollgate | µs/op | floor µs/op | over the floor µs (paired) | per round |",
                 "|---|---|---|---|---|---|"] + over_floor + [""]
    if floor_cpu is not None and none_cpu is not None:
        head += [f"The wasm runtime floor (the probe filter, which does nothing) costs {floor_cpu - none_cpu:+.1f} µs "
                 f"per request over no filter ({floor_cpu / none_cpu:.2f}×); every Tollgate module in a chain "
                 "pays it.", ""]
    lines[summary_at:summary_at] = head
    # memory
    lines += ["## Memory", ""]
    mem = bench.memory
    if not mem:
        lines += ["Not measured in this run (`--no-memory`).", ""]
    elif mem.get("skip"):
        lines += [f"{mem['skip']}"
                  + (f" (no-filter gateway RSS {mem['rss_none_kib'] / 1024:.1f} MiB)" if mem.get("rss_none_kib") else ""), ""]
    else:
        grown = mem["rss_after_kib"] - mem["rss_loaded_kib"]
        lines += [
            f"{mem['title']} (`{mem['source']}`)." + (f" {mem['note']}" if mem.get("note") else ""),
            "",
            "| gateway | resident memory (VmRSS) |",
            "|---|---|",
            f"| no filter, idle | {mem['rss_none_kib'] / 1024:.1f} MiB |",
        ] + [
            f"| {i['name']}, after warm-up | "
            + (f"{i['rss_kib'] / 1024:.1f} MiB (+{(i['rss_kib'] - mem['rss_none_kib']) / 1024:.1f} MiB) |"
               if i.get("rss_kib") else f"{i.get('skip')} |")
            for i in mem.get("idle", [])
        ] + [
            f"| {', '.join(mem['filters'])} sized for a million clients, after warm-up | {mem['rss_loaded_kib'] / 1024:.1f} MiB |",
            f"| after {mem['keys_sent']:,} distinct keys/URLs"
            + (f" (of {mem['keys']:,} planned: the run is capped in time)" if mem['keys_sent'] < mem['keys'] else "")
            + f" ({mem['seconds']:.0f} s, statuses {mem['statuses']}, "
            f"errors {mem['errors']}) | {mem['rss_after_kib'] / 1024:.1f} MiB (+{grown / 1024:.1f} MiB, "
            f"{grown * 1024 / max(1, mem['keys_sent']):.0f} bytes per key) |",
            "",
            "The filters' counters after the run (non-zero): "
            + (", ".join(f"`{k}` {c:,}" for k, c in sorted(mem.get("stats", {}).items())) or "none") + ".",
            "",
        ]
    if bench.problems:
        lines += ["## Scenario problems", ""] + [f"- {p}" for p in bench.problems] + [""]
    notes = RESULTS / "notes.md"
    if prof.name == "full" and notes.exists():
        lines += [notes.read_text().strip(), ""]
    return "\n".join(lines), data


# ---------------------------------------------------------------------------------------------


def ensure_loadgen():
    src = BENCH / "loadgen" / "src" / "main.rs"
    if LOADGEN.exists() and LOADGEN.stat().st_mtime >= src.stat().st_mtime:
        return
    log("building bench/loadgen ...")
    subprocess.run(["cargo", "build", "--release", "-q", "--manifest-path", str(BENCH / "loadgen" / "Cargo.toml")],
                   check=True)



def print_list(scenarios, problems, width: int = 32):
    """`--list`: the scenarios, their variants, and the problems found reading them."""
    for sc in scenarios:
        print(f"{sc.id}: {sc.title}  [{sc.source}]")
        for v in sc.variants:
            print(f"    {v.name:<{width}} {v.kind:<9} {v.skip or ''}")
    for p in problems:
        print("problem:", p)

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="every scenario briefly (no timing claims)")
    ap.add_argument("--only", action="append", help="scenario id, scenario/variant, or prefix* (repeatable)")
    ap.add_argument("--rounds", type=int, help="rounds (default: 3, quick: 1)")
    ap.add_argument("--cpu-ops", type=int, help="operations of the CPU measurement")
    ap.add_argument("--memory-keys", type=int, help="distinct keys for the memory measurement")
    ap.add_argument("--memory-seconds", type=float, help="time cap of the memory measurement (default 180)")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    ap.add_argument("--output", help="results file (default bench/results/latest.md, quick: quick.md)")
    ap.add_argument("--scenarios", action="append", metavar="DIR",
                    help="read scenarios from DIR instead of bench/scenarios/* (repeatable)")
    ap.add_argument("--keep", action="store_true", help="keep the Envoy configs and logs of the run")
    ap.add_argument("--list", action="store_true", help="list scenarios and variants, then exit")
    args = ap.parse_args(argv)

    prof = PROFILES["quick" if args.quick else "full"]
    if args.rounds:
        prof.rounds = args.rounds
    if args.cpu_ops:
        prof.cpu_ops = args.cpu_ops
    scenarios, problems = discover(args.only, args.scenarios)
    if args.list:
        print_list(scenarios, problems)
        return 0
    ensure_loadgen()
    bench = Bench(prof, scenarios, problems, args)
    try:
        bench.run()
    finally:
        bench.stop_all()
    text, data = render(bench)
    out = Path(args.output) if args.output else RESULTS / ("quick.md" if args.quick else "latest.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    print(text)
    failed = [v.key for v in bench.variants if v.failure]
    if failed:
        log("variants that failed: " + ", ".join(failed))
    if args.keep or failed:
        log(f"Envoy configs and logs: {bench.workdir}")
    else:
        shutil.rmtree(bench.workdir, ignore_errors=True)
    log(f"results: {rel(out.resolve())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
