"""Global rate limits on real processes: Envoys (--concurrency 2) with tollgate.ratelimit, the
rate limit service (tollgate-rls, Envoy's RLS protocol over gRPC) and a real redis-server.

Exactness across a fleet: two Envoys, each with its own tollgate-rls, one Redis, one limit of N.
`exact` admits exactly N; `leased` admits within the documented bound (never more than N when
the service says when its window ends; at most the units outstanding in leases fewer). Redis
stopped (or frozen) mid-run: each limit's failure mode, then back to normal when it returns."""

from __future__ import annotations

import os
import re
import signal
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import pytest

import harness
from harness import RateLimitService, Redis, grpc_cluster

QUOTA_EXCEEDED = "https://iana.org/assignments/http-problem-types#quota-exceeded"
# filters/ratelimit/src/global.rs FAILURE_LOG_INTERVAL_US: each worker logs the service's failures
# at most once per this interval.
FAILURE_LOG_INTERVAL_S = 10.0


def limits_yaml(*limits: tuple[str, int], key: str = "route", seconds: int = 3600) -> str:
    """tollgate-rls limits: one counter per value of `key` for each (name, max)."""
    out = []
    for name, n in limits:
        out.append(
            f"- namespace: tollgate\n  name: {name}\n  max_value: {n}\n  seconds: {seconds}\n"
            f"  conditions: [\"descriptors[0].limit == '{name}'\"]\n"
            f"  variables: [\"descriptors[0].{key}\"]\n")
    return "".join(out)


def filter_config(*limits: dict, routes: list[dict]) -> dict:
    return {
        "rate_limit_service": {"cluster": "tollgate_rls", "domain": "tollgate"},
        "limits": list(limits),
        "routes": routes,
    }


def glim(name, quota, mode, **global_kw):
    """A global limit; its call timeout is long (10 s) unless a test says otherwise, so that only
    a real outage, never a slow machine, applies the failure mode."""
    return {"name": name, "quota": quota, "window": "1h", "key": ["route"],
            "global": {"mode": mode, "timeout": "10s", **global_kw}}


@pytest.fixture
def stack():
    """Start Redis and rate limit services; everything is stopped at the end of the test."""
    started = []

    class Stack:
        def redis(self) -> Redis:
            r = Redis.start()
            started.append(r)
            return r

        def rls(self, limits: str, redis: Redis) -> RateLimitService:
            s = RateLimitService.start(limits, redis)
            started.append(s)
            return s

    yield Stack()
    for p in reversed(started):
        p.stop()


def start_envoy(envoy_factory, services, config, rls: RateLimitService):
    return envoy_factory(filters=[("ratelimit", config)], services=services, concurrency=2,
                         clusters=[grpc_cluster("tollgate_rls", rls.port)])


def blast(envoys, path: str, n: int, threads: int = 16) -> list:
    """`n` requests spread over `envoys` in turn, `threads` at a time; their responses."""
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda i: envoys[i % len(envoys)].get(path), range(n)))


def test_exact_admits_exactly_n_across_two_envoys(services, envoy_factory, stack):
    n = 60
    redis = stack.redis()
    limits = limits_yaml(("fleet", n))
    config = filter_config(glim("fleet", n, "exact"),
                           routes=[{"name": "fleet", "match": {"prefix": "/api/products"}, "limits": ["fleet"]}])
    # Two Envoys, each with its own rate limit service; one Redis.
    a = start_envoy(envoy_factory, services, config, stack.rls(limits, redis))
    b = start_envoy(envoy_factory, services, config, stack.rls(limits, redis))
    responses = blast([a, b], "/api/products/1", 3 * n)
    statuses = [r.status for r in responses]
    admitted = statuses.count(200)
    print(f"exact: {admitted} admitted of {len(statuses)} across two Envoys, limit {n}")
    assert admitted == n, statuses
    assert statuses.count(429) == 2 * n
    refused = next(r for r in responses if r.status == 429)
    assert refused.header("content-type") == "application/problem+json"
    assert refused.json()["type"] == QUOTA_EXCEEDED
    assert refused.json()["violated-policies"] == ["fleet"]
    assert refused.header("ratelimit-policy") == f'"fleet";q={n};w=3600'
    assert refused.header("ratelimit").startswith('"fleet";r=0;t=')
    assert 0 < int(refused.header("retry-after")) <= 3600
    ok = next(r for r in responses if r.status == 200)
    assert ok.header("ratelimit-policy") == f'"fleet";q={n};w=3600'
    # One call per request; every request decided by the service.
    calls = a.stat("tollgate.ratelimit.limit.fleet.rls_calls") + b.stat("tollgate.ratelimit.limit.fleet.rls_calls")
    assert calls == 3 * n
    assert a.stat("tollgate.ratelimit.rls_failures") == b.stat("tollgate.ratelimit.rls_failures") == 0


def test_local_limits_go_first_so_a_locally_refused_request_costs_no_call(services, envoy_factory, stack):
    redis = stack.redis()
    rls = stack.rls(limits_yaml(("fleet", 100)), redis)
    local = {"name": "local", "quota": 3, "window": "1h", "key": ["client_ip"]}
    config = filter_config(glim("fleet", 100, "exact"), local,
                           routes=[{"name": "r", "match": {"prefix": "/api/products"}, "limits": ["local", "fleet"]}])
    e = start_envoy(envoy_factory, services, config, rls)
    statuses = [e.get("/api/products/1").status for _ in range(6)]
    assert statuses == [200] * 3 + [429] * 3
    assert e.stat("tollgate.ratelimit.limit.fleet.rls_calls") == 3
    assert e.stat("tollgate.ratelimit.limit.local.limited") == 3


def test_leased_admits_within_the_documented_bound_across_two_envoys(services, envoy_factory, stack):
    n, lease_max = 400, 20
    redis = stack.redis()
    limits = limits_yaml(("fleet", n))
    config = filter_config(glim("fleet", n, "leased", lease_max=lease_max),
                           routes=[{"name": "fleet", "match": {"prefix": "/api/products"}, "limits": ["fleet"]}])
    a = start_envoy(envoy_factory, services, config, stack.rls(limits, redis))
    b = start_envoy(envoy_factory, services, config, stack.rls(limits, redis))
    total = 3 * n
    statuses = [r.status for r in blast([a, b], "/api/products/1", total)]
    admitted = statuses.count(200)
    calls = sum(e.stat("tollgate.ratelimit.limit.fleet.rls_calls") for e in (a, b))
    refills = sum(e.stat("tollgate.ratelimit.limit.fleet.lease_refills") for e in (a, b))
    unused = sum(e.stat("tollgate.ratelimit.limit.fleet.lease_unused_units") for e in (a, b))
    bound = sum(e.stat("tollgate.ratelimit.limit.fleet.over_admission_bound") for e in (a, b))
    print(f"leased: {admitted} admitted of {total} across two Envoys, limit {n}; "
          f"{calls} calls, {refills} lease refills")
    assert set(statuses) <= {200, 429}
    # The service says when its window ends: leases end with it, so never more than N ...
    assert bound == 0
    assert admitted <= n
    # ... and at most the units outstanding in the two Envoys' leases fewer (they are used
    # by later requests while the window lasts, so usually exactly N).
    assert admitted >= n - 2 * lease_max - unused
    # Leases were used (how many requests came before the first leases landed depends on the
    # machine's speed; test_leased_requests_do_not_call_while_the_lease_lasts checks that a
    # lease serves requests without calls).
    assert refills > 0 and calls < total


def test_leased_requests_do_not_call_while_the_lease_lasts(services, envoy_factory, stack):
    redis = stack.redis()
    rls = stack.rls(limits_yaml(("fleet", 1000)), redis)
    config = filter_config(glim("fleet", 1000, "leased", lease_max=100),
                           routes=[{"name": "fleet", "match": {"prefix": "/api/products"}, "limits": ["fleet"]}])
    e = start_envoy(envoy_factory, services, config, rls)
    assert e.get("/api/products/1").status == 200
    # The first request called for itself and asked for a lease; wait for the lease.
    harness.wait_for(lambda: e.stat("tollgate.ratelimit.limit.fleet.lease_refills") >= 1, 60, "a lease")
    calls = e.stat("tollgate.ratelimit.limit.fleet.rls_calls")
    # The lease (25 units: a quarter of lease_max) serves the next requests with no call; the
    # one that runs it low asks the root for the next lease, in the background.
    for _ in range(10):
        r = e.get("/api/products/1")
        assert r.status == 200
        assert r.header("ratelimit").startswith('"fleet";r=')
    assert e.stat("tollgate.ratelimit.limit.fleet.rls_calls") == calls


def log_stamps_by_thread(lines: list[str]) -> dict[str, list[datetime]]:
    """Envoy log lines (`[2026-12-04 13:21:07.853][15435][warning]...`) -> their timestamps, by
    the thread (worker) that wrote them, in order."""
    by: dict[str, list[datetime]] = {}
    for line in lines:
        m = re.match(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)\]\[(\d+)\]", line)
        assert m, f"not an Envoy log line: {line}"
        by.setdefault(m.group(2), []).append(datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f"))
    return by


def test_redis_down_applies_the_failure_mode_then_recovers(services, envoy_factory, stack):
    redis = stack.redis()
    rls = stack.rls(limits_yaml(("closed", 1000), ("open", 1000), ("leased", 1000)), redis)
    config = filter_config(
        glim("closed", 1000, "exact", failure_mode="deny"),
        glim("open", 1000, "exact", failure_mode="allow"),
        glim("leased", 1000, "leased", failure_mode="deny", lease_max=4),
        routes=[
            {"name": "closed", "match": {"prefix": "/api/users"}, "limits": ["closed"]},
            {"name": "open", "match": {"prefix": "/api/products"}, "limits": ["open"]},
            {"name": "leased", "match": {"prefix": "/api/orders"}, "limits": ["leased"]},
        ])
    e = start_envoy(envoy_factory, services, config, rls)
    assert e.get("/api/users/1").status == 200
    assert e.get("/api/products/1").status == 200
    assert e.get("/api/orders/1").status == 200

    redis.stop()
    denied = e.get("/api/users/1")
    assert denied.status == 503
    assert denied.header("retry-after") == "1"
    assert denied.header("content-type") == "application/problem+json"
    allowed = e.get("/api/products/1")
    assert allowed.status == 200
    assert allowed.header("ratelimit") is None
    # The leased limit serves what its lease holds, then meets its failure mode (deny).
    leased = [e.get("/api/orders/1").status for _ in range(12)]
    assert leased[-1] == 503, leased
    assert set(leased) <= {200, 503}
    failures = e.stat("tollgate.ratelimit.rls_failures")
    assert failures >= 3
    assert e.stat("tollgate.ratelimit.limit.closed.rls_failures") >= 1
    # Logged once per interval, not once per request: one worker's lines are at least the
    # interval apart by Envoy's own log timestamps (the test may take longer than an interval on
    # a loaded machine; the rule holds whatever it takes).
    lines = [l for l in e.log().splitlines() if "rate limit service (cluster" in l]
    assert lines, "no log line for the outage"
    assert "failures since the last report" in lines[0]
    for worker, stamps in log_stamps_by_thread(lines).items():
        gaps = [(b - a).total_seconds() for a, b in zip(stamps, stamps[1:])]
        # half a second of slack: the filter's clock is read a moment before Envoy stamps the line
        assert all(g >= FAILURE_LOG_INTERVAL_S - 0.5 for g in gaps), (worker, gaps, lines)

    # Redis is back: normal answers again once the service reconnects.
    redis.restart()
    harness.wait_for(lambda: e.get("/api/users/1").status == 200, 60, "the service to answer again")
    assert e.get("/api/products/1").header("ratelimit").startswith('"open";r=')
    harness.wait_for(lambda: e.get("/api/orders/1").status == 200, 60, "leases again")


def test_a_frozen_redis_is_a_timeout_then_the_failure_mode(services, envoy_factory, stack):
    redis = stack.redis()
    rls = stack.rls(limits_yaml(("closed", 1000)), redis)
    config = filter_config(glim("closed", 1000, "exact", failure_mode="deny", timeout="1s"),
                           routes=[{"name": "closed", "match": {"prefix": "/api/users"}, "limits": ["closed"]}])
    e = start_envoy(envoy_factory, services, config, rls)
    # a loaded machine may time the first calls out too: wait for one answered in time
    harness.wait_for(lambda: e.get("/api/users/1").status == 200, 60, "the service to answer")
    failures = e.stat("tollgate.ratelimit.limit.closed.rls_failures")
    os.kill(redis.proc.pid, signal.SIGSTOP)
    try:
        r = e.get("/api/users/1")
        assert r.status == 503
        assert e.stat("tollgate.ratelimit.limit.closed.rls_failures") == failures + 1
    finally:
        os.kill(redis.proc.pid, signal.SIGCONT)
    harness.wait_for(lambda: e.get("/api/users/1").status == 200, 60, "the service to answer again")


def test_bad_global_configuration_is_refused_at_load(services, envoy_factory):
    for config, field in [
        ({"limits": [glim("g", 10, "exact")], "routes": []}, "limits[0].global"),
        (filter_config({**glim("g", 10, "exact"), "burst": 3}, routes=[]), "limits[0].burst"),
        (filter_config(glim("g", 10, "leased", lease_max=11), routes=[]), "limits[0].global.lease_max"),
        (filter_config(glim("g", 10, "sometimes"), routes=[]), "limits[0].global.mode"),
    ]:
        e = envoy_factory(filters=[("ratelimit", config)], services=services, expect_failure=True)
        assert e.returncode != 0
        assert f"field `{harness.config_field('ratelimit', field)}`" in e.log(), e.log_tail()


def global_docs_example() -> dict:
    import json
    import re

    text = (harness.ROOT / "docs" / "filters" / "ratelimit.md").read_text()
    section = text.split("## Global limits", 1)[1]
    m = re.search(r"```json\n(.*?)```", section, re.S)
    assert m, "docs/filters/ratelimit.md: no JSON example under Global limits"
    return json.loads(m.group(1))


def test_the_documented_global_example_fits_the_schema_and_loads(services, envoy_factory, stack):
    example = global_docs_example()
    v = harness.schema_validator("ratelimit")
    assert not [e.message for e in v.iter_errors(example)]
    redis = stack.redis()
    rls = stack.rls(limits_yaml(("fleet-ip", 1000), key="client_ip", seconds=60), redis)
    e = start_envoy(envoy_factory, services, example, rls)
    r = e.get("/api/products/1", {"x-tollgate-consumer": "alice"})
    # fleet-consumer has no limit in this service: OK without a limit, so no fields for it
    assert r.status == 200, r
    assert r.header("ratelimit-policy") == '"fleet-ip";q=1000;w=60, "local-ip";q=10;w=1', r


@pytest.mark.parametrize("config", [
    {"limits": [glim("g", 10, "exact")]},  # no rate_limit_service
    filter_config({**glim("g", 10, "exact"), "burst": 3}, routes=[]),
    filter_config({**glim("g", 10, "exact"), "algorithm": "gcra"}, routes=[]),
    filter_config({**glim("g", 10, "exact"), "plans": {"pro": {"quota": 20}}}, routes=[]),
    filter_config(glim("g", 10, "leased", lease_max=0), routes=[]),
    filter_config(glim("g", 10, "sometimes"), routes=[]),
    filter_config(glim("g", 10, "exact", failure_mode="maybe"), routes=[]),
    {"rate_limit_service": {"domain": "x"}},
])
def test_schema_refuses_bad_global_configurations(config):
    assert not harness.schema_validator("ratelimit").is_valid(config), config


def test_the_bundled_demo_has_a_leased_global_limit(services, envoy_factory, stack):
    """envoy/envoy.yaml as shipped, with the service `make run` starts (envoy/rls-limits.yaml)."""
    from harness import bundled_config

    redis = stack.redis()
    rls = stack.rls((harness.ROOT / "envoy" / "rls-limits.yaml").read_text(), redis)
    e = envoy_factory(config=bundled_config(services, rls))
    r = e.get("/api/orders/1", {"x-api-key": "demo-key-pro"})
    assert r.status == 200, r
    assert r.header("ratelimit-policy").endswith('"fleet-ip";q=1000;w=60'), r
    # the service's units left: 999, or fewer when the first lease (13 units) got there first
    left = int(r.header("ratelimit").split('"fleet-ip";r=')[1].split(";")[0])
    assert 1000 - 1 - 13 <= left <= 999, r
    harness.wait_for(lambda: e.stat("tollgate.ratelimit.limit.fleet-ip.lease_refills") >= 1, 60, "a lease")
    calls = e.stat("tollgate.ratelimit.rls_calls")
    assert [e.get("/api/orders/1", {"x-api-key": "demo-key-pro"}).status for _ in range(5)] == [200] * 5
    assert e.stat("tollgate.ratelimit.rls_calls") == calls, "served from the lease"


def test_two_envoys_fail_closed_while_redis_is_down_and_count_exactly_again_after(services, envoy_factory, stack):
    n = 20
    redis = stack.redis()
    limits = limits_yaml(("fleet", n))
    config = filter_config(glim("fleet", n, "exact", failure_mode="deny"),
                           routes=[{"name": "fleet", "match": {"prefix": "/api/products"}, "limits": ["fleet"]}])
    a = start_envoy(envoy_factory, services, config, stack.rls(limits, redis))
    b = start_envoy(envoy_factory, services, config, stack.rls(limits, redis))
    before = [r.status for r in blast([a, b], "/api/products/1", 2 * n)]
    assert before.count(200) == n and before.count(429) == n, before

    redis.stop()
    down = [r.status for r in blast([a, b], "/api/products/1", 20)]
    assert down == [503] * 20, down
    assert a.stat("tollgate.ratelimit.limit.fleet.rls_failures") == 10
    assert b.stat("tollgate.ratelimit.limit.fleet.rls_failures") == 10

    # Redis back (empty: a new window): both services reconnect, and the fleet counts exactly again.
    redis.restart()
    for e in (a, b):
        harness.wait_for(lambda e=e: e.get("/api/products/1").status == 200, 60, "the service to answer again")
    after = [r.status for r in blast([a, b], "/api/products/1", 2 * n)]
    print(f"after Redis returned: {after.count(200)} admitted of {2 * n} (2 taken by the probes)")
    assert after.count(200) == n - 2 and after.count(429) == n + 2, after
