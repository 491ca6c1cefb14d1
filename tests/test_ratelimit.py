"""tollgate.ratelimit on a real Envoy (--concurrency 2): exactness across workers, GCRA burst and
refill, fixed windows, several limits, key sources, plans, cost, shadow mode, headers, bounded
memory and bad configuration."""

from __future__ import annotations

import http.client as httpclient
import json
import re
import socket
import threading
import time

import pytest

import harness
from harness import ROOT, Envoy

QUOTA_EXCEEDED = "https://iana.org/assignments/http-problem-types#quota-exceeded"


def lim(name, quota, window, key, **kw):
    return {"name": name, "quota": quota, "window": window, "key": key, **kw}


def route(prefix, limits, **kw):
    return {"match": {"prefix": f"/api/users/echo/{prefix}"}, "limits": limits, **kw}


# One Envoy for most tests; each test uses its own route and keys, so they do not interfere.
CONFIG = {
    "trusted_hops": 1,
    "headers": "both",
    "limits": [
        lim("exact", 100, "1d", ["route"]),
        lim("gcra", 1, "2s", ["client_ip"], burst=3),
        lim("window", 3, "3s", ["client_ip"], algorithm="fixed_window"),
        lim("multi-a", 3, "1h", ["client_ip"]),
        lim("multi-b", 2, "1h", ["client_ip"], algorithm="fixed_window"),
        lim("k-consumer", 2, "1h", ["consumer"]),
        lim("k-api-key", 2, "1h", ["api_key"]),
        lim("k-ip", 2, "1h", ["client_ip"]),
        lim("k-header", 2, "1h", [{"header": "x-tenant"}]),
        lim("k-query", 2, "1h", [{"query": "tenant"}]),
        lim("k-route", 2, "1h", ["route"]),
        lim("k-combo", 2, "1h", ["consumer", {"header": "x-device"}]),
        lim("plan", 2, "1h", ["consumer"], plans={"pro": {"quota": 5}}),
        lim("cost", 6, "1h", ["consumer"]),
        lim("shadow", 2, "1h", ["consumer"], shadow=True),
        lim("evict", 1, "1h", ["client_ip"], slots=8),
        lim("k-shared", 2, "1h", ["api_key"], missing_key="shared"),
        lim("writes", 2, "1h", ["route"]),
    ],
    "routes": [
        route("exact", ["exact"]),
        route("gcra", ["gcra"]),
        route("window", ["window"]),
        route("multi-both", ["multi-a", "multi-b"]),
        route("multi-a", ["multi-a"]),
        route("k-consumer", ["k-consumer"]),
        route("k-api-key", ["k-api-key"]),
        route("k-ip", ["k-ip"]),
        route("k-header", ["k-header"]),
        route("k-query", ["k-query"]),
        route("k-route-one", ["k-route"], name="one"),
        route("k-route-two", ["k-route"], name="two"),
        route("k-combo", ["k-combo"]),
        route("plan", ["plan"]),
        route("cost-3", ["cost"], cost=3),
        route("cost-1", ["cost"]),
        route("shadow", ["shadow"]),
        route("evict", ["evict"]),
        route("k-shared", ["k-shared"]),
        # The filter reads :method and :authority only because this route matches on them.
        {"match": {"prefix": "/api/users/echo/writes", "methods": ["POST"], "hosts": ["127.0.0.1"]},
         "limits": ["writes"]},
    ],
}


@pytest.fixture(scope="module")
def envoy(services):
    e = Envoy.start(filters=[("ratelimit", CONFIG)], services=services, concurrency=2)
    yield e
    e.stop()


def path(name: str, query: str = "") -> str:
    return f"/api/users/echo/{name}" + (f"?{query}" if query else "")


def policies(value: str | None) -> dict[str, dict[str, int]]:
    """Parse a RateLimit or RateLimit-Policy field: `"a";q=1;w=2, "b";...` -> {a: {q: 1, w: 2}}."""
    out = {}
    for item in (value or "").split(","):
        item = item.strip()
        if not item:
            continue
        m = re.fullmatch(r'"([^"]+)"((?:;[a-z]+=\d+)+)', item)
        assert m, f"not a structured field item: {item!r} in {value!r}"
        out[m.group(1)] = {k: int(v) for k, v in re.findall(r";([a-z]+)=(\d+)", m.group(2))}
    return out


def check_refused(r, limit: str, legacy: bool = True):
    """A 429 as the draft wants it: problem+json of the quota-exceeded type, Retry-After (integer
    seconds) never earlier than the `t` of the refusing limits, and the rate limit fields."""
    assert r.status == 429, r
    assert r.header("content-type") == "application/problem+json", r
    body = r.json()
    assert body["type"] == QUOTA_EXCEEDED and body["status"] == 429, body
    assert limit in body["violated-policies"], body
    retry = r.header("retry-after")
    assert retry is not None and retry.isdigit() and int(retry) >= 1, r
    state = policies(r.header("ratelimit"))
    assert limit in state, r
    assert int(retry) >= max(s["t"] for s in state.values()), r
    assert limit in policies(r.header("ratelimit-policy")), r
    if legacy:
        assert r.header("x-ratelimit-remaining") is not None and r.header("x-ratelimit-reset") is not None, r
    return int(retry)


def check_allowed(r, limit: str, remaining: int | None = None):
    assert r.status == 200, r
    state = policies(r.header("ratelimit"))
    assert limit in state, r
    assert limit in policies(r.header("ratelimit-policy")), r
    if remaining is not None:
        assert state[limit]["r"] == remaining, r
    return state[limit]


def crossed_lines(envoy, limit: str) -> list[str]:
    return [l for l in envoy.log().splitlines() if f"rate limit `{limit}` crossed" in l]


# ---------------------------------------------------------------------------------------------


def test_exact_across_two_workers_with_64_connections(envoy):
    """A limit of 100 admits exactly 100 of 320 requests sent on 64 concurrent keep-alive
    connections, spread over both Envoy workers."""
    allowed_before = envoy.stat("tollgate.ratelimit.allowed")
    results: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(64)
    deadline = time.monotonic() + 60

    def client():
        conn = httpclient.HTTPConnection("127.0.0.1", envoy.port, timeout=20)
        mine = []
        try:
            start.wait(20)
            for _ in range(5):
                if time.monotonic() > deadline:
                    break
                conn.request("GET", path("exact"))
                resp = conn.getresponse()
                resp.read()
                mine.append(resp.status)
        finally:
            conn.close()
            with lock:
                results.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert len(results) == 320, len(results)
    assert results.count(200) == 100, (results.count(200), results.count(429))
    assert results.count(429) == 220
    stats = envoy.stats()
    per_worker = {k: v for k, v in stats.items()
                  if re.fullmatch(r"listener\.127\.0\.0\.1_\d+\.worker_\d+\.downstream_cx_total", k)}
    assert len(per_worker) == 2 and all(v > 0 for v in per_worker.values()), per_worker
    assert envoy.stat("tollgate.ratelimit.allowed") - allowed_before == 100
    assert envoy.stat("tollgate.ratelimit.limit.exact.limited") == 220
    assert envoy.stat("tollgate.ratelimit.limit.exact.cas_exhausted") == 0
    # one warning for the key crossing its limit, whichever worker saw it first
    assert len(crossed_lines(envoy, "exact")) == 1, crossed_lines(envoy, "exact")


def test_gcra_burst_then_refill(envoy):
    """1 per 2s with a burst of 3: three at once, then one every 2s. The refills are the clock's:
    a run whose own elapsed time allowed one more refill than it counts on is repeated with a
    fresh bucket (another client), so a slow machine cannot break it."""
    for attempt in range(3):
        ip = {"x-forwarded-for": f"198.51.100.{10 + attempt}"}
        start = time.monotonic()
        rs = [envoy.get(path("gcra"), ip) for _ in range(3)]
        refused = envoy.get(path("gcra"), ip)
        if int((time.monotonic() - start) // 2) > 0:
            continue  # a refill may have come during the burst
        assert [check_allowed(r, "gcra")["r"] for r in rs] == [2, 1, 0]
        retry = check_refused(refused, "gcra")
        assert retry == 2
        time.sleep(retry + 0.2)  # the clock is the signal: one unit comes back
        after = [envoy.get(path("gcra"), ip) for _ in range(2)]
        if int((time.monotonic() - start) // 2) > 1:
            continue  # a second refill may have come
        check_allowed(after[0], "gcra", remaining=0)
        check_refused(after[1], "gcra")
        return
    raise AssertionError("three runs in a row took longer than the refills they count on")


def next_window_start(window: int) -> float:
    """Wait on the wall clock (Envoy's too) for the start of the next epoch-aligned window."""
    start = (time.time() // window + 1) * window
    while time.time() < start:
        time.sleep(min(0.05, max(0.0, start - time.time())))
    return start


def test_fixed_window(envoy):
    """3 per window of 3s aligned on the epoch: a full window, refusals, then a new window. Each
    part starts when a window does (the clock is the signal); a part that crossed into the next
    window is repeated with a fresh counter (another client), so a slow machine cannot break it."""
    for attempt in range(3):
        ip = {"x-forwarded-for": f"198.51.100.{20 + attempt}"}
        window = next_window_start(3)
        first = [envoy.get(path("window"), ip) for _ in range(4)]
        if time.time() >= window + 3:
            continue
        assert [check_allowed(r, "window")["r"] for r in first[:3]] == [2, 1, 0]
        retry = check_refused(first[3], "window")
        assert 1 <= retry <= 3
        # Retry-After points at (or after) the next window.
        assert time.time() + retry >= next_window_start(3) - 0.001
        window = window + 3
        statuses = [envoy.get(path("window"), ip).status for _ in range(4)]
        if time.time() >= window + 3:
            continue
        assert statuses == [200, 200, 200, 429]
        return
    raise AssertionError("three runs in a row crossed a window boundary")


def test_several_limits_all_must_admit_and_are_each_reported(envoy):
    ip = {"x-forwarded-for": "198.51.100.30"}
    r = envoy.get(path("multi-both"), ip)
    assert policies(r.header("ratelimit-policy")) == {"multi-a": {"q": 3, "w": 3600},
                                                      "multi-b": {"q": 2, "w": 3600}}
    state = policies(r.header("ratelimit"))
    assert state["multi-a"]["r"] == 2 and state["multi-b"]["r"] == 1
    check_allowed(envoy.get(path("multi-both"), ip), "multi-b", remaining=0)
    check_refused(envoy.get(path("multi-both"), ip), "multi-b")
    # the refused request took nothing from multi-a: one unit left there
    check_allowed(envoy.get(path("multi-a"), ip), "multi-a", remaining=0)
    check_refused(envoy.get(path("multi-a"), ip), "multi-a")


@pytest.mark.parametrize("limit, name, same, other", [
    ("k-consumer", "k-consumer",
     lambda i: ({"x-tollgate-consumer": "alice"}, ""), lambda: ({"x-tollgate-consumer": "bob"}, "")),
    ("k-api-key", "k-api-key",
     lambda i: ({"x-api-key": "key-one"}, ""), lambda: ({"x-api-key": "key-two"}, "")),
    ("k-header", "k-header",
     lambda i: ({"x-tenant": "acme", "x-other": str(i)}, ""), lambda: ({"x-tenant": "globex"}, "")),
    ("k-query", "k-query",
     lambda i: ({}, f"tenant=acme&page={i}"), lambda: ({}, "tenant=globex")),
    ("k-combo", "k-combo",
     lambda i: ({"x-tollgate-consumer": "alice", "x-device": "d1"}, ""),
     lambda: ({"x-tollgate-consumer": "alice", "x-device": "d2"}, "")),
    # x-forwarded-for with one trusted hop: only the rightmost entry counts; what a client puts
    # to its left is spoofable and changes nothing.
    ("k-ip", "k-ip",
     lambda i: ({"x-forwarded-for": f"6.6.6.{i}, 203.0.113.7"}, ""),
     lambda: ({"x-forwarded-for": "6.6.6.1, 203.0.113.8"}, "")),
])
def test_key_sources(envoy, limit, name, same, other):
    def send(hq, prefix=name):
        headers, query = hq
        return envoy.get(path(prefix, query), headers)

    check_allowed(send(same(0)), limit, remaining=1)
    check_allowed(send(same(1)), limit, remaining=0)
    check_refused(send(same(2)), limit)
    check_allowed(send(other()), limit, remaining=1)
    # the secret parts of keys are never logged
    for line in crossed_lines(envoy, limit):
        assert "key-one" not in line and "acme" not in line, line
    if limit == "k-ip":
        # the label of the key, built only for this line, names the client
        harness.wait_for(lambda: any("crossed by ip=203.0.113.7:" in l for l in crossed_lines(envoy, limit)),
                         5, "the warning naming the client IP")


def test_ipv6_clients_count_per_64(envoy):
    """Two addresses of one IPv6 /64 share a counter; another /64 has its own."""
    a1 = {"x-forwarded-for": "2001:db8:77:1::1"}
    a2 = {"x-forwarded-for": "2001:db8:77:1:ffff::2"}
    b = {"x-forwarded-for": "2001:db8:77:2::1"}
    assert [envoy.get(path("k-ip"), h).status for h in (a1, a2, a1, b)] == [200, 200, 429, 200]


def test_key_source_route(envoy):
    """One limit keyed by route: each route has its own counter."""
    assert [envoy.get(path("k-route-one")).status for _ in range(3)] == [200, 200, 429]
    assert [envoy.get(path("k-route-two")).status for _ in range(3)] == [200, 200, 429]


def test_missing_key_source_skips_the_limit(envoy):
    assert [envoy.get(path("k-consumer")).status for _ in range(4)] == [200] * 4


def test_missing_key_shared_counts_all_keyless_requests_together(envoy):
    assert [envoy.get(path("k-shared"), {"x-forwarded-for": f"192.0.2.{i}"}).status
            for i in range(3)] == [200, 200, 429]
    assert envoy.get(path("k-shared"), {"x-api-key": "own-key"}).status == 200


def test_routes_on_method_and_host(envoy):
    """A rule for POST to host 127.0.0.1 (the authority is 127.0.0.1:<port>: the port does not
    count): other methods pass unlimited."""
    assert [envoy.get(path("writes")).status for _ in range(4)] == [200] * 4
    rs = [envoy.request("POST", path("writes"), {}, b"{}") for _ in range(3)]
    assert [r.status for r in rs] == [200, 200, 429], rs
    check_refused(rs[2], "writes")
    assert envoy.request("PUT", path("writes"), {}, b"{}").status == 200


def test_bodies_pass_through_a_module_without_body_hooks(envoy):
    """The ratelimit module exports no body hook (only `proxy_on_response_headers`): a request
    body and a response body of many chunks go by whole, and the rate limit fields are on the
    answer."""
    body = "".join(f"{i:07d}," for i in range(12_500))  # 100,000 bytes
    tenant = {"x-tenant": "bodies"}
    r = envoy.request("POST", path("k-header"), tenant, body.encode())
    check_allowed(r, "k-header", remaining=1)
    echoed = r.json()
    assert echoed["method"] == "POST" and echoed["body"] == body, r
    assert len(r.body) > len(body)
    check_allowed(envoy.request("POST", path("k-header"), tenant, body.encode()), "k-header", remaining=0)
    check_refused(envoy.request("POST", path("k-header"), tenant, body.encode()), "k-header")


def test_plans(envoy):
    free = {"x-tollgate-consumer": "f1", "x-tollgate-plan": "free"}
    pro = {"x-tollgate-consumer": "p1", "x-tollgate-plan": "pro"}
    assert [envoy.get(path("plan"), free).status for _ in range(3)] == [200, 200, 429]
    r = envoy.get(path("plan"), pro)
    assert policies(r.header("ratelimit-policy"))["plan"] == {"q": 5, "w": 3600}
    assert [envoy.get(path("plan"), pro).status for _ in range(5)] == [200] * 4 + [429]


def test_cost(envoy):
    """A route costing 3 on a limit of 6: two requests, and the cheap route gets nothing left."""
    c = {"x-tollgate-consumer": "spender"}
    check_allowed(envoy.get(path("cost-3"), c), "cost", remaining=3)
    check_allowed(envoy.get(path("cost-3"), c), "cost", remaining=0)
    check_refused(envoy.get(path("cost-3"), c), "cost")
    check_refused(envoy.get(path("cost-1"), c), "cost")
    c2 = {"x-tollgate-consumer": "saver"}
    check_allowed(envoy.get(path("cost-1"), c2), "cost", remaining=5)
    check_allowed(envoy.get(path("cost-3"), c2), "cost", remaining=2)
    check_refused(envoy.get(path("cost-3"), c2), "cost")


def test_shadow_mode_reports_but_never_refuses(envoy):
    c = {"x-tollgate-consumer": "shadowy"}
    rs = [envoy.get(path("shadow"), c) for _ in range(5)]
    assert [r.status for r in rs] == [200] * 5
    assert [r.header("x-tollgate-ratelimit-shadow") for r in rs] == [None, None, "shadow", "shadow", "shadow"]
    # shadow limits do not show in the client-facing fields
    assert all(r.header("ratelimit") is None for r in rs)
    assert envoy.stat("tollgate.ratelimit.limit.shadow.shadow_limited") == 3
    assert envoy.stat("tollgate.ratelimit.limit.shadow.limited") == 0
    lines = crossed_lines(envoy, "shadow")
    assert len(lines) == 1 and "consumer=shadowy" in lines[0] and "shadow: not enforced" in lines[0], lines


def test_memory_is_bounded_distinct_clients_evict(envoy):
    """A table of 8 slots and 40 distinct clients: the oldest states are evicted (counted), and
    every new client is admitted (it starts with a full quota)."""
    statuses = [envoy.get(path("evict"), {"x-forwarded-for": f"192.0.2.{i}"}).status for i in range(40)]
    assert statuses == [200] * 40
    assert envoy.stat("tollgate.ratelimit.limit.evict.evicted") == 32
    # the most recent clients are still tracked
    check_refused(envoy.get(path("evict"), {"x-forwarded-for": "192.0.2.39"}), "evict")


def documented_bound(limits: list[dict]) -> tuple[int, int]:
    """Shared-data keys and bytes of keys and values, as docs/filters/ratelimit.md states them:
    per limit ceil(slots/8) keys `tollgate.ratelimit:<name>:<g|f>:<buckets>:<i>` of 8 x 32 bytes,
    plus one marker key."""
    keys = total = 0
    for l in limits:
        buckets = -(-l.get("slots", 8192) // 8)
        prefix = f"tollgate.ratelimit:{l['name']}:{'f' if l.get('algorithm') == 'fixed_window' else 'g'}:{buckets}:"
        keys += buckets + 1
        total += buckets * (len(prefix + str(buckets - 1)) + 256) + len(prefix + "allocated") + 1
    return keys, total


def test_memory_bound_is_published_and_matches_the_docs(envoy):
    keys, total = documented_bound(CONFIG["limits"])
    assert envoy.stat("tollgate.ratelimit.shared_keys") == keys
    assert envoy.stat("tollgate.ratelimit.shared_bytes_bound") == total
    # limits of the default 8,192 slots: under 300 KB each
    assert total < len(CONFIG["limits"]) * 300 * 1024, total


def test_metrics_and_no_panics(envoy):
    stats = envoy.stats("tollgate.ratelimit")
    for m in ("skipped", "allowed", "limited", "shadow_limited", "failures", "cas_exhausted", "evictions"):
        assert f"wasmcustom.tollgate.ratelimit.{m}" in stats, m
    # One increment per outcome: no `requests` counter, no per-limit `allowed`.
    assert "wasmcustom.tollgate.ratelimit.requests" not in stats
    assert not [k for k in stats if k.startswith("wasmcustom.tollgate.ratelimit.limit.") and k.endswith(".allowed")]
    assert stats["wasmcustom.tollgate.ratelimit.failures"] == 0
    # Each request counts in exactly one outcome counter: admitted, or skipped (no route).
    outcomes = ("skipped", "allowed", "limited")
    before = {m: envoy.stat(f"tollgate.ratelimit.{m}") for m in outcomes}
    assert envoy.get(path("k-ip"), headers={"x-forwarded-for": "198.51.100.77"}).status == 200
    assert envoy.get("/api/users/echo/no-rule").status == 200
    after = {m: envoy.stat(f"tollgate.ratelimit.{m}") for m in outcomes}
    assert {m: after[m] - before[m] for m in outcomes} == {"skipped": 1, "allowed": 1, "limited": 0}
    assert "panicked" not in envoy.log()


# ---------------------------------------------------------------------------------------------
# Bad configuration


@pytest.mark.parametrize("config, field, reason", [
    ({"limits": [lim("a", 0, "1s", ["client_ip"])]}, "limits[0].quota", "at least 1"),
    ({"limits": [lim("a", -10, "1s", ["client_ip"])]}, "limits[0].quota", "invalid value"),
    ({"limits": [lim("a", 10, "0s", ["client_ip"])]}, "limits[0].window", "at least 1s"),
    ({"limits": [lim("a", 10, "1s", ["client_ip", "cookie"])]}, "limits[0].key[1]", "unknown variant `cookie`"),
    ({"limits": [lim("a", 1, "1s", ["route"]), lim("a", 2, "1s", ["route"])]}, "limits[1].name",
     "duplicate limit name `a`"),
    ({"limits": [lim("a", 1, "1s", ["route"])], "routes": [{"limits": ["b"]}]}, "routes[0].limits[0]",
     "no limit named `b`"),
])
def test_bad_configuration_is_refused_with_one_line(services, envoy_factory, config, field, reason):
    e = envoy_factory(filters=[("ratelimit", config)], services=services, expect_failure=True)
    assert e.returncode not in (None, 0)
    lines = harness.config_error_lines(e, "ratelimit")
    assert len(lines) == 1, e.log_tail()
    assert f"field `{harness.config_field('ratelimit', field)}`" in lines[0] and reason in lines[0], lines[0]


# ---------------------------------------------------------------------------------------------
# The bundled configuration, the documented example and the JSON Schema


def bundled_ratelimit_config() -> dict:
    from harness import bundled_filter_configs

    return bundled_filter_configs()["ratelimit"]


def documented_example() -> dict:
    text = (ROOT / "docs" / "filters" / "ratelimit.md").read_text()
    m = re.search(r"<!-- example -->\s*```json\n(.*?)```", text, re.S)
    assert m, "docs/filters/ratelimit.md has no example block"
    return json.loads(m.group(1))


def test_bundled_configuration_limits_per_plan_and_per_ip(services, envoy_factory):
    """envoy/envoy.yaml's rate limiting alone: anonymous clients per IP, consumers per plan."""
    e = envoy_factory(filters=[("ratelimit", bundled_ratelimit_config())], services=services,
                      concurrency=2)
    # 10 per minute per IP (one more every 6s): generous about a slow machine
    anon = [e.get("/api/products/1") for _ in range(13)]
    assert [r.status for r in anon[:10]] == [200] * 10, anon
    check_refused(anon[-1], "anonymous-ip", legacy=False)
    free = {"x-tollgate-consumer": "ann", "x-tollgate-plan": "free"}
    pro = {"x-tollgate-consumer": "pat", "x-tollgate-plan": "pro"}
    free_statuses = [e.get("/api/products/1", free).status for _ in range(7)]
    assert free_statuses[:5] == [200] * 5 and free_statuses[-1] == 429, free_statuses
    assert [e.get("/api/products/1", pro).status for _ in range(20)] == [200] * 20
    assert e.get("/healthz").status == 404  # not limited, not routed by the test Envoy


def test_documented_example_and_bench_scenarios_load(services, envoy_factory):
    configs = [documented_example()]
    for p in sorted((ROOT / "bench" / "scenarios" / "ratelimit").glob("tollgate-*.json")):
        configs.append(json.loads(p.read_text()))
    assert len(configs) >= 3
    for c in configs:
        e = envoy_factory(filters=[("ratelimit", c)], services=services)
        assert e.get("/api/products/1").status in (200, 429)
        e.stop()


def schema_validator():
    return harness.schema_validator("ratelimit")


def test_schema_accepts_the_documented_and_bundled_configurations():
    v = schema_validator()
    for c in [documented_example(), bundled_ratelimit_config(), CONFIG, {}]:
        errors = [e.message for e in v.iter_errors(c)]
        assert not errors, (c, errors)
    for p in (ROOT / "bench" / "scenarios" / "ratelimit").glob("tollgate-*.json"):
        assert v.is_valid(json.loads(p.read_text())), p


@pytest.mark.parametrize("config", [
    {"limits": [lim("a", 0, "1s", ["client_ip"])]},
    {"limits": [lim("a", -1, "1s", ["client_ip"])]},
    {"limits": [lim("a", 1, "1s", ["cookie"])]},
    {"limits": [lim("a", 1, "1s", [])]},
    {"limits": [lim("a b", 1, "1s", ["route"])]},
    {"limits": [lim("a", 1, "1s", ["route"], algorithm="leaky")]},
    {"limits": [lim("a", 1, "1s", ["route"], burst=2, algorithm="fixed_window")]},
    {"limits": [lim("a", 1, "1s", ["route"], plans={"pro": {"quota": 0}})]},
    {"limits": [{"name": "a", "quota": 1, "window": "1s"}]},
    {"routes": [{"limits": ["a"], "cost": 0}]},
    {"headers": "sometimes"},
    {"ipv6_prefix": 129},
    {"trusted_hops": -1},
])
def test_schema_refuses_what_the_filter_refuses(config):
    assert not schema_validator().is_valid(config), config


def test_readme_demo_through_the_whole_bundled_chain(services, envoy_factory):
    """The README's curl loop on envoy/envoy.yaml as shipped (auth -> ratelimit -> cache ->
    aggregate): anonymous clients reach 429 after 10 requests, with the documented headers."""
    from harness import bundled_config

    e = envoy_factory(config=bundled_config(services))
    rs = [e.get("/api/products/1") for _ in range(12)]
    assert [r.status for r in rs[:10]] == [200] * 10, rs
    assert rs[0].header("ratelimit-policy") == '"anonymous-ip";q=10;w=60', rs[0]
    assert policies(rs[0].header("ratelimit"))["anonymous-ip"]["r"] == 9, rs[0]
    last = rs[-1]
    retry = check_refused(last, "anonymous-ip", legacy=False)
    assert 1 <= retry <= 6, last
    # identified through the auth filter's demo API keys: the plan it forwards picks the limit
    free = [e.get("/api/orders/1", {"x-api-key": "demo-key-free"}) for _ in range(7)]
    assert [r.status for r in free[:5]] == [200] * 5 and free[-1].status == 429, free
    assert policies(free[0].header("ratelimit-policy")) == {
        "consumer-minute": {"q": 5, "w": 60}, "consumer-daily": {"q": 1000, "w": 86400}}, free[0]
    check_refused(free[-1], "consumer-minute", legacy=False)
    pro = [e.get("/api/orders/1", {"x-api-key": "demo-key-pro"}) for _ in range(7)]
    assert [r.status for r in pro] == [200] * 7, pro
    # GCRA at 600 a minute gives a unit back every 100 ms: seven requests leave 593 when they
    # take no time, more on a slower machine, never fewer.
    assert 593 <= policies(pro[-1].header("ratelimit"))["consumer-minute"]["r"] < 600, pro[-1]
    assert policies(pro[-1].header("ratelimit-policy"))["consumer-minute"] == {"q": 600, "w": 60}, pro[-1]
    assert e.stat("tollgate.ratelimit.limited") >= 2


@pytest.mark.skipif(harness.MODULE_MODE == "combined",
                    reason="the combined module exports proxy_on_done (the cache needs it): Envoy tells it")
def test_requests_whose_client_went_away_are_swept(services):
    """The ratelimit module exports no `proxy_on_done` (one entry into the VM fewer per request):
    its dispatcher forgets a request after the response headers. A request whose client goes
    away before them leaves its state behind until a sweep asks Envoy which requests it still has
    (docs/architecture.md, dispatch rule 4): at 256 live requests, then whenever they reach twice
    the number the last sweep left. On one worker: 260 requests held upstream (the sweep at 256
    finds all of them live), their clients go away; 260 more held: at 512 live the sweep forgets
    the first 260, and requests are answered as usual."""
    config = {"limits": [lim("sweep", 100000, "1h", ["route"])],
              "routes": [{"match": {"prefix": "/api/users/"}, "limits": ["sweep"]}]}
    # No route timeout: a held request must not be answered (504) by Envoy while the test runs,
    # however slowly the machine goes.
    routes = [{"match": {"prefix": "/api/users/"},
               "route": {"cluster": "users", "prefix_rewrite": "/users/", "timeout": "0s"}}]
    e = Envoy.start(filters=[("ratelimit", config)], services=services, concurrency=1,
                    routes=routes, component_log_level="wasm:debug")
    n = 260
    socks = []
    reset = "http.gateway.downstream_cx_destroy_remote_active_rq"

    def hold(name: str):
        # In steps of 50, each waited for at the upstream: never more connections waiting for
        # Envoy's accept than its listen backlog (128) holds, on a machine of any speed.
        for i in range(n):
            s = socket.create_connection(("127.0.0.1", e.port), timeout=30)
            s.sendall(f"GET /api/users/{i}?hold={name} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
            socks.append(s)
            if (i + 1) % 50 == 0 or i + 1 == n:
                # Every request so far went through the filter (the upstream holds all of them).
                services.wait_held(name, i + 1)

    def sweeps() -> list[str]:
        return re.findall(r"sweep: (\d+) ended contexts forgotten", e.log())

    try:
        hold("sweep-a")
        # At 256 live requests, all of them running (the log may lag: waited for).
        harness.wait_for(lambda: sweeps() == ["0"], 30, "one sweep that forgot nothing")
        for s in socks:
            s.close()
        socks.clear()
        # Envoy resets each stream as its client goes away; the module is not told.
        harness.wait_for(lambda: e.stats(reset).get(reset, 0) >= n, 60, f"{n} streams reset by their clients")
        # Envoy reset their upstream requests too: the demo's threads that held them can go (no
        # answer reaches the filter), leaving room for the next 260.
        services.release("sweep-a")
        hold("sweep-b")
        # At 512 live requests: the first 260 had ended.
        harness.wait_for(lambda: sweeps() == ["0", str(n)], 30, f"a second sweep that forgot {n}")
        for s in socks:
            s.close()
        socks.clear()
        check_allowed(e.get("/api/users/1"), "sweep")
    finally:
        for s in socks:
            s.close()
        services.release("sweep-a")
        services.release("sweep-b")
        e.stop()
