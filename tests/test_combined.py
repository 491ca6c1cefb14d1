"""The combined module (build/tollgate.wasm) on a real Envoy: the four filters in one VM behave
as separate filters would. A local reply from one filter stops the later ones, a paused filter
holds the later ones until it continues, callouts of two filters in one request reach the right
filter, and an error in one section refuses the whole configuration, naming the section. These
tests use the combined module whatever TOLLGATE_MODULE says (the other test files run against
both)."""

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import harness
from auth_helpers import ISSUER, Idp, build_mint, mint, public_jwks
from harness import combined_filter, schema_validator, static_cluster

# SHA-256 of the demo API key `demo-key-pro` (as in envoy/envoy.yaml).
DEMO_KEY_PRO = "7b340101426eaa6810ee547503b923bfd895a40cd62b1e52686bf8ffaa8d6e36"


@pytest.fixture(scope="module")
def token():
    """A demo ES256 token (DEMO-ONLY keys of envoy/demo-keys)."""
    build_mint()
    return mint(aud="tollgate-demo")


RATELIMIT = {"limits": [{"name": "per-consumer", "quota": 1000, "window": "1m", "key": ["consumer"]}],
             "routes": [{"match": {"prefix": "/api/"}, "limits": ["per-consumer"]}]}
CACHE = {"routes": [{"match": {"prefix": "/api/products/"}}]}
AGGREGATE = {"routes": [{"name": "dash", "match": {"template": "/api/dashboard/{user}"}, "calls": [
    {"name": "user", "cluster": "users", "path": "/users/{user}", "required": True, "timeout": "5s"},
    {"name": "orders", "cluster": "orders", "path": "/orders?user={user}", "timeout": "5s"}]}]}


def start(envoy_factory, services, auth, clusters=(), **kw):
    sections = [("auth", auth), ("ratelimit", RATELIMIT), ("cache", CACHE), ("aggregate", AGGREGATE)]
    return envoy_factory(http_filters=[combined_filter(sections)], services=services,
                         clusters=list(clusters), **kw)


def counted(envoy, name):
    return envoy.handled(name)


class HeldJwks:
    """A JWKS endpoint that holds every answer until released (a knob, not a delay)."""

    def __init__(self):
        self.release = threading.Event()
        self.hits = 0
        self.lock = threading.Lock()
        held = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                with held.lock:
                    held.hits += 1
                held.release.wait(30)
                body = public_jwks()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, client_address: None
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def count(self):
        with self.lock:
            return self.hits

    def stop(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def test_a_local_reply_from_auth_stops_the_later_filters(services, envoy_factory):
    auth = {"api_keys": {"keys": [{"sha256": DEMO_KEY_PRO, "consumer": "acme"}]},
            "routes": [{"match": {"prefix": "/api/"}}]}
    envoy = start(envoy_factory, services, auth)
    ok = envoy.get("/api/products/1", headers={"x-api-key": "demo-key-pro"})
    assert ok.status == 200, ok
    before = {n: counted(envoy, n) for n in harness.FILTERS}
    assert all(v == 1 for v in before.values()), before
    refused = envoy.get("/api/products/1", headers={"x-api-key": "wrong"})
    assert refused.status == 401, refused
    assert refused.header("content-type") == "application/problem+json"
    assert counted(envoy, "auth") == 2
    for name in ("ratelimit", "cache", "aggregate"):
        assert counted(envoy, name) == 1, (name, envoy.stats("tollgate"))


def test_a_paused_filter_holds_the_later_ones_until_it_continues(services, envoy_factory, token):
    keys = HeldJwks()
    try:
        auth = {"providers": [{"name": "demo", "issuer": ISSUER, "audiences": ["tollgate-demo"],
                               "algorithms": ["ES256"],
                               "remote_jwks": {"cluster": "keys", "path": "/jwks", "cache_duration": "5m",
                                               "timeout": "20s"}}],
                "routes": [{"match": {"prefix": "/api/"}}]}
        envoy = start(envoy_factory, services, auth, clusters=[static_cluster("keys", keys.port)])
        result = {}

        def send():
            result["r"] = envoy.get("/api/products/2", headers={"authorization": f"Bearer {token}"},
                                    timeout=40)

        t = threading.Thread(target=send)
        t.start()
        # The request is in Envoy, where auth waits for the keys it is fetching (auth counts a
        # request only in its outcome counter, when it ends: the gateway's active requests
        # show it) ...
        harness.wait_for(lambda: envoy.stat("http.gateway.downstream_rq_active") == 1
                         and keys.count() >= 1, 60, "auth to wait for the held key fetch")
        assert counted(envoy, "auth") == 0
        # ... and the later filters have not seen it.
        assert [counted(envoy, n) for n in ("ratelimit", "cache", "aggregate")] == [0, 0, 0]
        keys.release.set()
        t.join(40)
        assert result["r"].status == 200, result
        assert [counted(envoy, n) for n in harness.FILTERS] == [1, 1, 1, 1]
    finally:
        keys.stop()


def test_callouts_of_two_filters_in_one_request_reach_the_right_filter(services, envoy_factory):
    """auth introspects the token (a callout of the request), then aggregate calls two services
    (callouts of the same request): each answer must reach its own filter."""
    idp = Idp()
    try:
        auth = {"introspection": {"cluster": "idp", "path": "/introspect", "client_id": "gw",
                                  "client_secret": "s3cret"},
                "routes": [{"match": {"prefix": "/api/"}}]}
        envoy = start(envoy_factory, services, auth, clusters=[static_cluster("idp", idp.port)])
        r = envoy.get("/api/dashboard/1", headers={"authorization": "Bearer active-bob"})
        assert r.status == 200, r
        assert r.header("x-aggregate-complete") == "true", r
        body = r.json()
        assert body["user"]["id"] == 1 and isinstance(body["orders"], (list, dict)), body
        assert idp.count("/introspect") == 1
        assert envoy.stat("tollgate.aggregate.ep.dash.complete") == 1
        assert envoy.stat("tollgate.auth.allowed.introspection") >= 1
        assert "panicked" not in envoy.log()
    finally:
        idp.stop()


def test_an_error_in_one_section_refuses_the_whole_configuration_naming_it(services, envoy_factory):
    bad = dict(RATELIMIT, routes=[{"match": {"template": "/a/{*x}/b"}}])
    sections = [("auth", {}), ("ratelimit", bad), ("cache", CACHE)]
    envoy = envoy_factory(http_filters=[combined_filter(sections)], services=services, expect_failure=True)
    assert envoy.returncode not in (None, 0)
    lines = [l for l in envoy.log().splitlines() if "tollgate: invalid configuration" in l]
    assert len(lines) == 1, envoy.log_tail()
    assert "field `ratelimit.routes[0].match`" in lines[0], lines[0]


def test_the_bundled_demo_runs_on_the_combined_module(services, envoy_factory):
    cfg = harness.bundled_config(services, modules="combined")
    names = [f["name"] for f in cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
             ["typed_config"]["http_filters"]]
    assert names == ["tollgate", "envoy.filters.http.router"]
    envoy = envoy_factory(config=cfg)
    assert envoy.get("/api/products/1").status == 200
    assert envoy.get("/api/orders/1", headers={"x-api-key": "demo-key-pro"}).status == 200
    assert envoy.get("/api/orders/1").status == 401
    for name in harness.FILTERS:
        assert envoy.handled(name) >= 1, name


# --- the JSON Schema of the combined configuration ---------------------------------------------


def test_schema_accepts_the_bundled_configuration():
    v = schema_validator("tollgate")
    errors = list(v.iter_errors(harness.bundled_combined_config()))
    assert not errors, [e.message for e in errors]
    assert v.is_valid({}) and v.is_valid({"cache": {}})


@pytest.mark.parametrize("config", [
    {"nope": {}},
    {"auth": None},
    {"auth": []},
    {"ratelimit": {"no_such_field": 1}},
    {"cache": {"routes": [{"match": {"prefix": "/a", "exact": "/a"}}]}},
])
def test_schema_refuses_what_the_module_refuses(config):
    assert not schema_validator("tollgate").is_valid(config)
