"""tollgate.aggregate on a real Envoy: fan-out, dependent calls, merging, shapes, failures,
circuit breakers, hedging and Cache-Control, against the demo services."""

import json
import threading
import time

import pytest

import harness
from harness import ROOT

def agg(routes, **top):
    return [("aggregate", dict(top, routes=routes))]


def start(envoy_factory, services, routes, concurrency=1, **top):
    return envoy_factory(filters=agg(routes, **top), services=services, concurrency=concurrency)


def call(name, cluster, path, **kw):
    return dict(kw, name=name, cluster=cluster, path=path)


DASH_MATCH = {"template": "/api/dashboard/{user}", "methods": ["GET"]}


def test_unmatched_requests_pass_through(services, envoy_factory):
    envoy = start(envoy_factory, services, [
        {"match": DASH_MATCH, "calls": [call("user", "users", "/users/{user}")]}])
    r = envoy.get("/api/users/1")
    assert r.status == 200 and r.header("x-demo-service") == "users", r
    assert r.header("x-aggregate-complete") is None
    assert envoy.stat("tollgate.aggregate.requests") == 1


def in_background(fn):
    """Run `fn` in a thread; the returned function joins it and gives fn's result."""
    out = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()

    def result():
        t.join(60)
        assert out, "the request did not finish"
        return out[0]
    return result


def test_parallel_fan_out_has_every_call_out_at_once(services, envoy_factory):
    """The three calls are at their backends at the same time (each held there until released):
    sequential calls would never have more than one out. No timing is involved."""
    envoy = start(envoy_factory, services, [{
        "name": "par", "match": DASH_MATCH, "deadline": "60s",
        "calls": [
            call("user", "users", "/users/{user}?hold=agg-par", timeout="50s"),
            call("orders", "orders", "/orders?user={user}&hold=agg-par", timeout="50s"),
            call("product", "products", "/products/{user}?hold=agg-par", timeout="50s"),
        ]}])
    answer = in_background(lambda: envoy.get("/api/dashboard/2", timeout=60))
    try:
        services.wait_held("agg-par", 3)
    finally:
        services.release("agg-par")
    r = answer()
    assert r.status == 200, r
    assert r.header("x-aggregate-complete") == "true"
    body = r.json()
    assert body["user"]["id"] == 2 and body["product"]["id"] == 2
    assert body["orders"]["service"] == "orders"
    assert envoy.stat("tollgate.aggregate.ep.par.call.user.calls") == 1


def test_dependent_call_uses_an_earlier_answer(services, envoy_factory):
    services.reset_stats()
    envoy = start(envoy_factory, services, [{
        "match": DASH_MATCH,
        "calls": [
            call("user", "users", "/users/{user}"),
            call("company", "products", "/products/{user.company_id}", rename={"name": "company_name"}),
            call("first_order_product", "products", "/products/{orders.items.0.product_ids.1}"),
            call("orders", "orders", "/orders?user={user}"),
        ]}])
    r = envoy.get("/api/dashboard/7")
    assert r.status == 200, r
    body = r.json()
    assert body["user"]["company_id"] == 3  # demo: 7 % 5 + 1
    assert body["company"]["id"] == 3 and body["company"]["company_name"] == "Product 3"
    # orders item 1 has product_ids [2, 2] (demo: 1 % 7 + 1, 1 % 11 + 1)
    assert body["first_order_product"]["id"] == body["orders"]["items"][0]["product_ids"][1]
    assert services.hits("products", "/products/3") == 1


def test_merge_modes(services, envoy_factory):
    envoy = start(envoy_factory, services, [{
        "match": DASH_MATCH,
        "calls": [
            call("user", "users", "/users/{user}"),  # key (default)
            call("root", "products", "/products/1", merge="root", allow=["name", "price"]),
            call("p2", "products", "/products/2", merge="append", key="products"),
            call("p3", "products", "/products/3", merge="append", key="products"),
        ]}])
    r = envoy.get("/api/dashboard/4")
    assert r.status == 200, r
    body = r.json()
    assert body["user"]["id"] == 4
    assert body["name"] == "Product 1" and "price" in body and "stock" not in body
    assert [p["id"] for p in body["products"]] == [2, 3]


def test_deep_merge_and_fixed_headers(services, envoy_factory):
    envoy = start(envoy_factory, services, [{
        "match": DASH_MATCH,
        "calls": [
            call("a", "users", "/echo/a", merge="deep", pointer="/headers",
                 allow=["x-one", "x-request-id"], headers={"x-one": "1"}),
            call("b", "orders", "/echo/b", merge="deep", allow=["headers.x-two", "service"],
                 headers={"x-two": "2"}),
        ]}])
    r = envoy.get("/api/dashboard/1", headers={"x-request-id": "rid-1", "authorization": "Bearer s"})
    body = r.json()
    assert body == {"x-one": "1", "x-request-id": "rid-1", "headers": {"x-two": "2"}, "service": "orders"}, body


def test_pointer_and_field_lists(services, envoy_factory):
    envoy = start(envoy_factory, services, [{
        "match": DASH_MATCH,
        "calls": [
            call("orders", "orders", "/orders?user={user}", pointer="/items", allow=["id", "total", "currency"],
                 deny=["currency"], rename={"total": "amount"}),
            call("first", "orders", "/orders?user={user}", pointer="/items/0/product_ids/0"),
            call("user", "users", "/users/{user}", deny=["email", "plan"]),
        ]}])
    body = envoy.get("/api/dashboard/5").json()
    assert body["orders"] == [{"id": i, "amount": (i * 1234) % 10000 + 99} for i in range(1, 6)]
    assert body["first"] == 2
    assert set(body["user"]) == {"id", "name", "company_id"}


PROFILES = [{
    "match": {"template": "/{client}/dashboard/{user}"},
    "calls": [
        call("user", "users", "/users/{user}"),
        call("orders", "orders", "/orders?user={user}", pointer="/items"),
    ],
    "profiles": [
        {"name": "mobile", "header": {"name": "x-client", "value": "mobile"}, "calls": ["user"],
         "allow": ["user.name"]},
        {"name": "lite", "path_prefix": "/lite/", "deny": ["orders.currency", "user.email"]},
    ]}]


def test_profiles_by_header_and_by_path_prefix(services, envoy_factory):
    services.reset_stats()
    envoy = start(envoy_factory, services, PROFILES)
    full = envoy.get("/web/dashboard/3")
    assert full.header("x-aggregate-profile") is None
    # A cache in front must keep the shapes apart.
    assert full.header("vary") == "x-client", full
    assert set(full.json()) == {"user", "orders"} and "email" in full.json()["user"]
    mobile = envoy.get("/web/dashboard/3", headers={"x-client": "mobile"})
    assert mobile.status == 200, mobile
    assert mobile.header("x-aggregate-profile") == "mobile"
    assert mobile.header("vary") == "x-client"
    assert mobile.json() == {"user": {"name": "User 3"}}
    assert len(mobile.body) < len(full.body) / 4
    assert services.hits("orders", "/orders") == 1  # the mobile shape did not call orders
    lite = envoy.get("/lite/dashboard/3")
    assert lite.header("x-aggregate-profile") == "lite"
    body = lite.json()
    assert "email" not in body["user"] and "name" in body["user"]
    assert all("currency" not in o and "total" in o for o in body["orders"])


def test_optional_calls_failing_timing_out_or_answering_garbage(services, envoy_factory):
    envoy = start(envoy_factory, services, [{
        "name": "opt", "match": DASH_MATCH, "errors": True,
        "calls": [
            call("user", "users", "/users/{user}", required=True),
            call("failing", "orders", "/orders?status=500"),
            call("slow", "orders", "/orders?hold=agg-opt-slow", timeout="300ms"),
            call("garbage", "products", "/products/1?content_type=text/html"),
            call("big", "products", "/products/1?size=5000", max_response_bytes=1000),
            call("missing", "products", "/products/0"),
        ]}])
    r = envoy.get("/api/dashboard/1")
    services.release("agg-opt-slow")  # held at the backend until now: the call timed out
    assert r.status == 200, r
    assert r.elapsed >= 0.28, "the call's timeout (300ms) is not cut short"
    assert r.header("x-aggregate-complete") == "false"
    assert r.header("cache-control") == "no-store"
    body = r.json()
    assert body["user"]["id"] == 1
    for k in ("failing", "slow", "garbage", "big", "missing"):
        assert body[k] is None, k
    errors = {e["call"]: e for e in body["errors"]}
    assert set(errors) == {"failing", "slow", "garbage", "big", "missing"}
    assert errors["failing"]["error"] == "status" and errors["failing"]["status"] == 500
    assert errors["failing"]["backend"] == "orders"
    assert errors["slow"]["error"] == "timeout", errors["slow"]
    assert "status" not in errors["slow"], "Envoy's own 504 is not the backend's status"
    assert errors["garbage"]["error"] == "not_json"
    assert errors["big"]["error"] == "too_large"
    assert errors["missing"]["status"] == 404
    assert envoy.stat("tollgate.aggregate.ep.opt.call.slow.timeouts") == 1
    assert envoy.stat("tollgate.aggregate.ep.opt.call.failing.failures") == 1
    assert envoy.stat("tollgate.aggregate.ep.opt.partial") == 1


def test_huge_answers_fail_as_too_large_and_the_vm_survives(services, envoy_factory):
    """8 MB answers against the default 1 MiB limit: the adapter copies only the limit plus one
    byte into the VM, the calls fail as too_large, and the VM keeps serving."""
    envoy = start(envoy_factory, services, [{
        "match": DASH_MATCH, "errors": True,
        "calls": [call("a", "products", "/products/1?size=8000000"),
                  call("b", "orders", "/orders/1?size=8000000"),
                  call("user", "users", "/users/{user}")]}])
    for _ in range(2):
        r = envoy.get("/api/dashboard/1", timeout=30)
        assert r.status == 200 and r.header("x-aggregate-complete") == "false", r
        errors = {e["call"]: e for e in r.json()["errors"]}
        assert set(errors) == {"a", "b"}
        assert errors["a"]["error"] == "too_large" and "1048576 bytes" in errors["a"]["detail"], errors
        assert r.json()["user"]["id"] == 1
    assert "panicked" not in envoy.log() and "Wasm VM failed" not in envoy.log()


def test_unknown_cluster_and_refused_connection_are_unreachable_not_a_status(services, envoy_factory):
    envoy = envoy_factory(filters=agg([{
        "match": DASH_MATCH, "errors": True,
        "calls": [call("user", "users", "/users/{user}"), call("ghost", "no_such_cluster", "/x"),
                  call("dead", "dead", "/x")]}]),
        services=services, clusters=[harness.static_cluster("dead", harness.free_port())])
    r = envoy.get("/api/dashboard/1")
    assert r.status == 200, r
    errors = {e["call"]: e for e in r.json()["errors"]}
    assert errors["ghost"]["error"] == "unreachable", errors
    # Envoy's own 503 "upstream connect error" is not the backend's status.
    assert errors["dead"]["error"] == "unreachable" and "status" not in errors["dead"], errors
    assert envoy.stat("tollgate.aggregate.backend.dead.failures") == 1


def test_required_call_failing_gives_502_and_timing_out_gives_504(services, envoy_factory):
    envoy = start(envoy_factory, services, [
        {"name": "e502", "match": {"template": "/a/{user}"}, "calls": [
            call("user", "users", "/users/{user}?status=503", required=True),
            call("orders", "orders", "/orders?hold=agg-e502")]},
        {"name": "e504", "match": {"template": "/b/{user}"}, "calls": [
            call("user", "users", "/users/{user}?hold=agg-e504", required=True, timeout="250ms"),
            call("orders", "orders", "/orders")]},
        {"name": "deadline", "match": {"template": "/c/{user}"}, "deadline": "300ms", "calls": [
            call("user", "users", "/users/{user}?hold=agg-e504", required=True, timeout="5s")]},
    ])
    # The held calls answer only when released, after the assertions: each answer below came
    # without them.
    try:
        check_required_call_failures(envoy)
    finally:
        services.release("agg-e502")
        services.release("agg-e504")


def check_required_call_failures(envoy):
    r = envoy.get("/a/1")
    assert r.status == 502, r
    assert r.header("content-type") == "application/problem+json"
    p = r.json()
    assert p["backend"] == "users" and p["call"] == "user" and p["error"] == "status"
    assert p["status"] == 502 and p["backend_status"] == 503
    assert r.text.count('"status":') == 1, r.text
    assert "users" in p["detail"]
    # (the orders call is still held at its backend: the 502 did not wait for it)
    r = envoy.get("/b/1")
    assert r.status == 504, r
    assert r.header("content-type") == "application/problem+json"
    assert r.json()["error"] == "timeout" and r.json()["backend"] == "users"
    assert r.elapsed >= 0.2, "the call's timeout (250ms) is not cut short"
    r = envoy.get("/c/1")
    assert r.status == 504, r
    assert r.elapsed >= 0.25, "the deadline (300ms) is not cut short"
    assert envoy.stat("tollgate.aggregate.ep.e502.failed") == 1
    assert envoy.stat("tollgate.aggregate.ep.e504.failed") == 1


def worker_connections(envoy) -> list[int]:
    stats = envoy.stats("worker_")
    return [v for k, v in sorted(stats.items()) if k.startswith("listener.") and k.endswith("downstream_cx_total")]


def many(envoy, n, path):
    """n concurrent requests (each on its own connection, so both workers get some)."""
    out = []
    lock = threading.Lock()

    def one():
        r = envoy.get(path)
        with lock:
            out.append(r)
    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(out) == n
    return out


def error_of(r) -> str:
    errors = r.json()["errors"]
    return errors[0]["error"] if errors else "none"


def test_circuit_breaker_opens_fails_fast_and_recovers_across_workers(services, envoy_factory):
    """No timing assumption except lower bounds: on a slow machine the cool-down may end while
    requests are failing fast; the probe that then goes out is told apart by the half_opened
    counter, and every check is written in counts."""
    cool_down = 3.0
    envoy = start(envoy_factory, services, [{
        "name": "cb", "match": DASH_MATCH, "errors": True,
        "calls": [call("user", "users", "/users/{user}?status={query.status}")]}],
        concurrency=2, circuit_breaker={"failures": 3, "cool_down": f"{int(cool_down * 1000)}ms"})
    services.reset_stats()
    before_opening = time.monotonic()
    # Three failures at once, on both workers, count together (CAS in shared data).
    for r in many(envoy, 3, "/api/dashboard/1?status=500"):
        assert r.json()["errors"][0]["status"] == 500, r
    assert envoy.stat("tollgate.aggregate.breaker.users.opened") == 1
    assert services.hits("users", "/users/1") == 3
    # Open: requests fail fast, whichever worker they land on; the backend sees nothing but
    # probes. Batches until both workers have taken new connections (one per request).
    before = worker_connections(envoy)
    assert len(before) == 2, envoy.stats("worker_")
    rejected = probes = 0
    for _ in range(20):
        for r in many(envoy, 5, "/api/dashboard/1?status=500"):
            assert r.status == 200 and r.header("x-aggregate-complete") == "false", r
            e = error_of(r)
            assert e in ("circuit_open", "status"), r
            rejected += e == "circuit_open"
            probes += e == "status"
        after = worker_connections(envoy)
        if all(a > b for a, b in zip(after, before)) and rejected >= 10:
            break
    assert all(a > b for a, b in zip(after, before)), (before, after)
    assert rejected >= 10
    # Every call that reached the backend while open was a probe (the other worker did not
    # keep its own, closed, breaker).
    assert envoy.stat("tollgate.aggregate.breaker.users.half_opened") == probes
    assert envoy.stat("tollgate.aggregate.breaker.users.opened") == 1 + probes
    assert services.hits("users", "/users/1") == 3 + probes
    assert envoy.stat("tollgate.aggregate.ep.cb.call.user.rejected") == rejected
    # After the cool-down one probe goes through; it succeeds and the breaker closes.
    deadline = time.monotonic() + 10 * cool_down
    while True:
        r = envoy.get("/api/dashboard/1")
        if r.header("x-aggregate-complete") == "true":
            break
        assert error_of(r) == "circuit_open", r
        assert time.monotonic() < deadline, "the breaker never let a probe through"
        time.sleep(0.2)
    assert time.monotonic() - before_opening >= cool_down
    assert envoy.stat("tollgate.aggregate.breaker.users.half_opened") == probes + 1
    assert envoy.stat("tollgate.aggregate.breaker.users.closed") == 1
    for r in many(envoy, 6, "/api/dashboard/1"):
        assert r.header("x-aggregate-complete") == "true", r
    assert services.hits("users", "/users/1") == 3 + probes + 1 + 6


def test_breaker_probe_failure_reopens(services, envoy_factory):
    envoy = start(envoy_factory, services, [{
        "match": DASH_MATCH, "errors": True,
        "calls": [call("user", "users", "/users/{user}?status=500")]}],
        circuit_breaker={"failures": 2, "cool_down": "1s"})
    services.reset_stats()
    for _ in range(2):
        assert error_of(envoy.get("/api/dashboard/1")) == "status"
    seen = []
    deadline = time.monotonic() + 30
    while envoy.stat("tollgate.aggregate.breaker.users.half_opened") < 2:
        seen.append(error_of(envoy.get("/api/dashboard/1")))
        assert time.monotonic() < deadline, seen
        time.sleep(0.1)
    # Each probe failed and opened the breaker again for a cool-down; the rest failed fast.
    probes = seen.count("status")
    assert probes == envoy.stat("tollgate.aggregate.breaker.users.half_opened") == 2
    assert envoy.stat("tollgate.aggregate.breaker.users.opened") == 1 + probes
    assert seen.count("circuit_open") == len(seen) - probes >= 1, seen
    assert services.hits("users", "/users/1") == 2 + probes


def test_client_errors_do_not_open_the_breaker(services, envoy_factory):
    envoy = start(envoy_factory, services, [{
        "match": DASH_MATCH, "errors": True,
        "calls": [call("user", "users", "/users/{user}?status={query.status}")]}],
        circuit_breaker={"failures": 2, "cool_down": "30s"})
    services.reset_stats()
    for _ in range(3):  # a backend that answers 404 works
        assert envoy.get("/api/dashboard/1?status=404").json()["errors"][0]["status"] == 404
    assert envoy.stat("tollgate.aggregate.breaker.users.opened") == 0
    for _ in range(2):  # 5xx count
        assert envoy.get("/api/dashboard/1?status=502").json()["errors"][0]["status"] == 502
    assert envoy.stat("tollgate.aggregate.breaker.users.opened") == 1
    assert error_of(envoy.get("/api/dashboard/1")) == "circuit_open"
    assert services.hits("users", "/users/1") == 5


def test_breaker_probe_whose_client_went_away_is_replaced_at_once(services, envoy_factory):
    """The probe's client hangs up while the probe is out (held at the backend): its lease (call
    timeout + 1 s = 51 s) is released when the request ends, so the very next request probes,
    neither after the lease nor after another cool-down. Ordered by the hold and the filter's own
    log line, no timing: one worker, so that next request comes after the release."""
    envoy = envoy_factory(filters=agg([{
        "match": DASH_MATCH, "errors": True, "deadline": "60s",
        "calls": [call("user", "users", "/users/{user}?status={query.status}&hold={query.hold}",
                       timeout="50s")]}], circuit_breaker={"failures": 1, "cool_down": "1s"}),
        services=services, component_log_level="wasm:debug")
    try:
        assert error_of(envoy.get("/api/dashboard/1?status=500")) == "status"
        # After the cool-down a request becomes the probe: held at the backend, its client hangs up.
        deadline = time.monotonic() + 30
        while True:
            assert time.monotonic() < deadline, "the breaker never let a probe through"
            try:
                r = envoy.get("/api/dashboard/1?hold=agg-vanish", timeout=5)
            except OSError:  # socket.timeout: the probe is out, held (the hold says so), or slow
                if services.hold_state("agg-vanish")["waiting"] == 1:
                    break
                continue
            assert error_of(r) == "circuit_open", r
            time.sleep(0.1)
        assert services.hold_state("agg-vanish")["waiting"] == 1
        envoy.wait_log("releasing the breaker probe of `users`")
        assert envoy.stat("tollgate.aggregate.breaker.users.half_opened") == 1
        # Without the release the lease would keep every call out for 51 s.
        r = envoy.get("/api/dashboard/1")
        assert r.header("x-aggregate-complete") == "true", r
        assert envoy.stat("tollgate.aggregate.breaker.users.half_opened") == 2
        assert envoy.stat("tollgate.aggregate.breaker.users.closed") == 1
    finally:
        services.release("agg-vanish")


def test_hedging_sends_a_second_call_and_the_first_success_wins(services, envoy_factory):
    envoy = start(envoy_factory, services, [{
        "name": "hedge", "match": DASH_MATCH,
        "calls": [call("user", "users", "/users/{user}?hold_first=agg-hedge", timeout="30s",
                       hedge_after="100ms")]},
        {"name": "calm", "match": {"template": "/calm/{user}"},
         "calls": [call("user", "users", "/users/{user}", timeout="30s", hedge_after="20s")]}])
    services.reset_stats()
    try:
        # The first call is held at the backend (until the end of the test); the hedge, sent after
        # 100 ms, answers.
        r = envoy.get("/api/dashboard/6")
        assert services.hold_state("agg-hedge")["waiting"] == 1
    finally:
        services.release("agg-hedge")
    assert r.status == 200, r
    assert r.header("x-aggregate-complete") == "true"
    assert r.json()["user"]["id"] == 6
    assert r.elapsed >= 0.09, "the hedge waits for hedge_after (100ms)"
    assert services.hits("users", "/users/6") == 2
    assert envoy.stat("tollgate.aggregate.ep.hedge.call.user.hedges") == 1
    # A backend that answers before hedge_after is not hedged.
    r = envoy.get("/calm/6")
    assert r.status == 200 and r.header("x-aggregate-complete") == "true", r
    assert services.hits("users", "/users/6") == 3
    assert envoy.stat("tollgate.aggregate.ep.calm.call.user.hedges") == 0
    assert "panicked" not in envoy.log()


@pytest.mark.parametrize("parts, want", [
    ({"users": "private, max-age=30", "products": "public, max-age=60"}, "private, max-age=30"),
    ({"users": "public, max-age=120", "products": "public, max-age=60"}, "public, max-age=60"),
    ({"users": "no-cache", "products": "public, max-age=60"}, "public, no-cache"),
    ({"users": "no-store", "products": "public, max-age=60"}, "no-store"),
    ({"users": "public, max-age=60, s-maxage=5", "products": "public, max-age=30"},
     "public, max-age=30, s-maxage=5"),
])
def test_cache_control_is_the_most_restrictive(parts, want, services, envoy_factory):
    envoy = start(envoy_factory, services, [{
        "match": DASH_MATCH,
        "calls": [call("user", "users", "/users/{user}?cache_control={query.u}"),
                  call("product", "products", "/products/{user}?cache_control={query.p}")]}])
    from urllib.parse import quote
    r = envoy.get(f"/api/dashboard/1?u={quote(parts['users'])}&p={quote(parts['products'])}")
    assert r.status == 200 and r.header("x-aggregate-complete") == "true", r
    assert r.header("cache-control") == want


def test_vary_of_the_parts_is_kept(services, envoy_factory):
    envoy = start(envoy_factory, services, [{
        "match": DASH_MATCH,
        "calls": [call("user", "users", "/users/{user}?vary=Accept-Language"),
                  call("product", "products", "/products/{user}?vary=x-user,accept-language")]}])
    r = envoy.get("/api/dashboard/1")
    assert r.status == 200 and r.header("vary") == "accept-language, x-user", r


def test_refused_configuration_names_the_field(services, envoy_factory):
    for config, field, reason in [
        ({"routes": [{"match": DASH_MATCH, "calls": [
            call("a", "users", "/a/{b.id}"), call("b", "users", "/b/{a.id}")]}]},
         "routes[0].calls[0].path", "dependency cycle"),
        ({"routes": [{"match": DASH_MATCH, "calls": [call("a", "users", "/a/{nope}")]}]},
         "routes[0].calls[0].path", "unknown template variable"),
        ({"routes": [{"match": DASH_MATCH, "calls": [
            call("a", "users", "/a"), call("b", "users", "/b", key="a")]}]},
         "routes[0].calls[1].key", "duplicate key"),
        # A header the client chooses must not reach a call whose breaker every client shares.
        ({"circuit_breaker": {"failures": 5}, "routes": [{"match": DASH_MATCH, "calls": [
            call("a", "orders", "/orders", forward_headers=["traceparent", "x-demo-delay"])]}]},
         "routes[0].calls[0].forward_headers[1]", "every client shares"),
        ({"routes": [{"match": DASH_MATCH, "calls": [call("a", "users", "/u/{identity.x-org}")]}]},
         "routes[0].calls[0].path", "identity_headers"),
    ]:
        envoy = envoy_factory(filters=[("aggregate", config)], services=services, expect_failure=True)
        lines = harness.config_error_lines(envoy, "aggregate")
        assert len(lines) == 1, envoy.log_tail()
        assert f"field `{harness.config_field('aggregate', field)}`" in lines[0] and reason in lines[0], lines[0]


# --- the caller's identity ---------------------------------------------------------------------

ME = {"name": "me", "match": {"exact": "/api/me", "methods": ["GET"]}, "errors": True, "calls": [
    call("user", "users", "/users/{consumer}", required=True),
    call("seen", "orders", "/echo/{consumer}", pointer="/headers"),
    call("blind", "products", "/echo/blind", pointer="/headers", forward_identity=False),
]}


def test_calls_carry_the_callers_identity_and_paths_use_it(services, envoy_factory):
    """What the auth filter set (here sent directly: no auth filter in this Envoy) reaches the
    backends, and `{consumer}` chooses the record, not a path segment the client wrote."""
    envoy = start(envoy_factory, services, [ME])
    r = envoy.get("/api/me", {"x-tollgate-consumer": "alice", "x-tollgate-plan": "pro", "x-other": "1"})
    assert r.status == 200 and r.header("x-aggregate-complete") == "true", r
    body = r.json()
    assert body["user"]["id"] == "alice" and body["user"]["name"] == "alice", body
    assert body["seen"]["x-tollgate-consumer"] == "alice" and body["seen"]["x-tollgate-plan"] == "pro"
    assert "x-other" not in body["seen"]
    assert "x-tollgate-consumer" not in body["blind"] and "x-tollgate-plan" not in body["blind"]
    # The reply is built from the caller's identity: no shared cache may keep it.
    assert r.header("cache-control").startswith("private") or r.header("cache-control") == "no-store", r


def test_a_composite_request_without_the_identity_it_needs_is_refused(services, envoy_factory):
    envoy = start(envoy_factory, services, [ME])
    services.reset_stats()
    r = envoy.get("/api/me")
    assert r.status == 401, r
    assert r.header("content-type") == "application/problem+json"
    assert r.json()["type"] == "https://tollgate.dev/problems/aggregate/identity-required"
    assert services.hits("users", "/users/") == 0 and services.get("users", "/stats").json()["requests"] == 0
    assert envoy.stat("tollgate.aggregate.ep.me.no_identity") == 1


def test_backends_that_check_the_identity_see_it(envoy_factory):
    """Demo services that refuse unidentified callers (as `make run` starts users and orders):
    the calls that carry the identity pass, a call with `forward_identity: false` is refused."""
    strict = harness.DemoServices.start(require_identity=("users", "orders"))
    try:
        envoy = start(envoy_factory, strict, [
            {"name": "d", "match": {"exact": "/api/me"}, "errors": True, "calls": [
                call("user", "users", "/users/{consumer}", required=True),
                call("orders", "orders", "/orders?user={consumer}", pointer="/items", allow=["id"]),
                call("orders_blind", "orders", "/orders?user={consumer}", forward_identity=False)]}])
        r = envoy.get("/api/me", {"x-tollgate-consumer": "bob"})
        assert r.status == 200, r
        body = r.json()
        assert body["user"]["id"] == "bob" and len(body["orders"]) == 5, body
        assert body["orders_blind"] is None
        assert body["errors"] == [{"call": "orders_blind", "backend": "orders", "error": "status", "status": 401,
                                   "detail": "answered 401"}], body
    finally:
        strict.stop()


# --- the bundled demo configuration, documentation example and schema -------------------------

def test_bundled_dashboard_as_the_readme_shows_it(envoy_factory):
    """README's aggregation section on envoy/envoy.yaml as shipped, with the demo services as
    `make run` starts them (users and orders check the identity the calls carry)."""
    from auth_helpers import build_mint, mint
    from harness import bundled_config
    build_mint()
    strict = harness.DemoServices.start(require_identity=("users", "orders"))
    try:
        envoy = envoy_factory(config=bundled_config(strict))
        harness.wait_for(lambda: envoy.stat("tollgate.auth.jwks_fetches") >= 1, 60, "the demo keys")
        alice = {"authorization": "Bearer " + mint(sub="alice")}
        r = envoy.get("/api/dashboard", alice)
        assert r.status == 200, r
        assert (r.header("content-type"), r.header("cache-control"), r.header("x-aggregate-complete"),
                r.header("vary")) == ("application/json", "no-store", "true", "x-client"), r
        body = r.json()
        assert body["company"] == {"id": 2, "name": "Product 2"} and body["errors"] == [], body
        assert body["orders"][0] == {"currency": "EUR", "id": 1, "status": "shipped", "total": 1333}, body
        assert body["user"] == {"company_id": 2, "id": "alice", "name": "alice", "plan": "free"}, body
        assert envoy.get("/api/dashboard").status == 401
        assert envoy.get("/api/dashboard", {"x-api-key": "demo-key-pro"}).json()["user"]["id"] == "acme"
        assert envoy.get("/api/dashboard/2", alice).status == 403
        ops = {"authorization": "Bearer " + mint(sub="ops", scopes="dashboard:any")}
        other = envoy.get("/api/dashboard/2", ops).json()
        assert other["company"] == {"id": 3, "name": "Product 3"}, other
        assert other["user"] == {"company_id": 3, "id": 2, "name": "User 2", "plan": "pro"}, other
        m = envoy.get("/api/dashboard", dict(alice, **{"x-client": "mobile"}))
        assert m.header("x-aggregate-profile") == "mobile", m
        assert m.json()["user"] == {"name": "alice"} and m.json()["orders"][:2] == [
            {"id": 1, "total": 1333}, {"id": 2, "total": 2567}], m
        slow = envoy.get("/api/dashboard", dict(alice, **{"x-demo-delay": "800"}))
        assert (slow.status, slow.header("cache-control"), slow.header("x-aggregate-complete")) == \
            (200, "no-store", "false"), slow
        assert slow.json()["orders"] is None and slow.json()["errors"] == [
            {"backend": "orders", "call": "orders", "detail": "no answer within 500ms", "error": "timeout"}]
        failed = envoy.get("/api/dashboard/0", ops)
        assert failed.status == 502 and failed.json()["backend"] == "users", failed
        # Other paths are not the aggregate filter's: they go on to the router.
        other = envoy.get("/api/products/1")
        assert other.header("x-aggregate-complete") is None and other.header("x-demo-service") == "products", other
    finally:
        strict.stop()


def doc_example() -> dict:
    text = (ROOT / "docs" / "filters" / "aggregate.md").read_text()
    start_marker = "<!-- example -->"
    block = text.split(start_marker, 1)[1].split("```json", 1)[1].split("```", 1)[0]
    return json.loads(block)


def test_documented_example_runs(services, envoy_factory):
    envoy = envoy_factory(filters=[("aggregate", doc_example())], services=services)
    r = envoy.get("/api/dashboard", {"x-tollgate-consumer": "2"})
    assert r.status == 200 and r.header("x-aggregate-complete") == "true", r
    body = r.json()
    assert body["user"]["name"] == "User 2" and body["company"] == {"id": 3, "name": "Product 3"}, body
    assert body["orders"][0] == {"amount": 1333, "id": 1, "status": "shipped"}, body
    m = envoy.get("/api/dashboard", {"x-tollgate-consumer": "2", "x-client": "mobile"}).json()
    assert m["user"] == {"name": "User 2"} and m["orders"][0] == {"amount": 1333, "id": 1}, m
    assert envoy.get("/api/dashboard").status == 401


def test_schema_accepts_the_example_and_bundled_config_and_refuses_bad_ones():
    from harness import bundled_filter_configs, schema_validator
    v = schema_validator("aggregate")
    assert not list(v.iter_errors(doc_example()))
    assert not list(v.iter_errors(bundled_filter_configs()["aggregate"]))
    ok_call = {"name": "a", "cluster": "users", "path": "/users/1"}
    assert v.is_valid({"consumer_header": "x-who", "identity_headers": ["x-who", "x-org"], "routes": [{"calls": [
        dict(ok_call, path="/users/{consumer}/{identity.x-org}", forward_identity=False)]}]})
    assert v.is_valid({"routes": [{"max_request_bytes": 10, "calls": [
        dict(ok_call, forward_body=True, forward_headers=["content-type", "x-request-id"],
             headers={"x-te-ok": "1"})]}]})
    for bad in [
        {"routes": [{"calls": [{"name": "a", "cluster": "users"}]}]},  # no path
        {"routes": [{"calls": [dict(ok_call, merge="sideways")]}]},
        {"routes": [{"calls": [dict(ok_call, timeout="soon")]}]},
        {"routes": [{"calls": [dict(ok_call, surprise=1)]}]},
        {"routes": [{"calls": [ok_call], "profiles": [{"name": "m"}]}]},
        {"circuit_breaker": {"failures": 0}},
        {"routes": [{"calls": [dict(ok_call, forward_headers=["Content-Length"])]}]},
        {"routes": [{"calls": [dict(ok_call, headers={"host": "x"})]}]},
        {"routes": [{"calls": [dict(ok_call, forward_body="yes")]}]},
        {"routes": [{"max_request_bytes": 0, "calls": [ok_call]}]},
        {"routes": [{"calls": [dict(ok_call, forward_identity="yes")]}]},
        {"identity_headers": ["x-org", "content-length"]},
        {"consumer_header": "bad header"},
    ]:
        assert not v.is_valid(bad), bad


def test_post_with_a_body_is_answered_from_its_headers(services, envoy_factory):
    """Without `forward_body` the calls start at the headers (Envoy holds the body back while a
    proxy-wasm filter pauses there, and it is never read); the request must still be answered."""
    envoy = start(envoy_factory, services, [{
        "match": {"exact": "/api/submit", "methods": ["POST"]},
        "calls": [call("a", "users", "/echo/a", method="POST", pointer="/method"),
                  call("b", "orders", "/orders/1", allow=["id"])]}])
    payload = json.dumps({"x": 1, "pad": "y" * 200000})
    r = envoy.request("POST", "/api/submit", headers={"content-type": "application/json"}, body=payload)
    assert r.status == 200, r
    assert r.json() == {"a": "POST", "b": {"id": 1}}


def test_calls_can_forward_the_request_body(services, envoy_factory):
    """The headers go on to the router (Envoy would not hand a filter paused at the headers the
    body); the body is held by the filter, the calls start at its end with it, and the merged
    reply replaces the route's upstream request, which never gets the body."""
    envoy = start(envoy_factory, services, [{
        "match": {"exact": "/api/orders/submit", "methods": ["POST"]}, "max_request_bytes": 500000,
        "calls": [call("a", "users", "/echo/a", method="POST", forward_body=True,
                       forward_headers=["content-type"]),
                  call("b", "orders", "/orders/1", allow=["id"])]}])
    services.reset_stats()
    for size in (10, 300000):  # one chunk, many chunks
        payload = json.dumps({"x": 1, "pad": "y" * size})
        r = envoy.request("POST", "/api/orders/submit", headers={"content-type": "application/json"},
                          body=payload)
        assert r.status == 200, r
        body = r.json()
        assert body["b"] == {"id": 1}
        assert body["a"]["method"] == "POST"
        assert body["a"]["body"] == payload
        assert body["a"]["headers"]["content-type"] == "application/json"
        assert r.header("x-aggregate-complete") == "true"
    # Without a body the calls start at the headers (and the router never sees the request).
    r = envoy.request("POST", "/api/orders/submit")
    assert r.status == 200 and r.json()["a"]["body"] == "", r
    # Too large a body: 413, no call. (Over Envoy's own buffer limit, 1 MiB by default, Envoy
    # answers 413 itself, in text/plain.)
    r = envoy.request("POST", "/api/orders/submit", body="z" * 600000)
    assert r.status == 413 and r.header("content-type") == "application/problem+json", r
    assert "panicked" not in envoy.log()


def test_forwarding_the_body_needs_a_route_to_an_upstream(services, envoy_factory):
    """When the route answers by itself (here a direct response) Envoy stops handing the body to
    the filters: that answer goes through (counted, logged) instead of the request hanging."""
    routes = [{"match": {"path": "/api/submit"},
               "direct_response": {"status": 404, "body": {"inline_string": "no such page"}}}]
    envoy = envoy_factory(filters=agg([{
        "name": "sub", "match": {"exact": "/api/submit", "methods": ["POST"]},
        "calls": [call("a", "users", "/echo/a", method="POST", forward_body=True)]}]),
        services=services, routes=routes + harness.default_routes())
    r = envoy.request("POST", "/api/submit", body=json.dumps({"x": 1}), timeout=30)
    assert r.status == 404 and r.text == "no such page", r
    assert envoy.stat("tollgate.aggregate.ep.sub.body_lost") == 1
    assert "needs a route to a live upstream" in envoy.log()
