"""tollgate.cache on a real Envoy: RFC 9111 hits and misses, Vary, 304s, revalidation, stale
serving, Authorization / Set-Cookie safety, the memory bound, purge and cross-worker sharing.

Most tests share one Envoy (two workers) and use their own URLs; the demo services' `/stats`
tell how often the origin was asked. Knobs go in `x-demo-*` headers, which are not in the key.
Nothing here waits for time to pass or asserts how long something took: a stale entry is made
stale by the origin's `Age` (the `age` knob), and events are ordered with the demo's holds (a
request to a held path waits at the origin until the test releases it) and Envoy's stats.
"""

import hashlib
import json
import time

import pytest
import harness
from harness import ROOT, Envoy

PURGE_KEY = "test-purge-key"
PURGE_SHA = hashlib.sha256(PURGE_KEY.encode()).hexdigest()


def routes(timeout="10s"):
    # requests with `x-dead` go to a port where nothing listens: the origin is down
    out = [{"match": {"prefix": "/api/products", "headers": [{"name": "x-dead", "present_match": True}]},
            "route": {"cluster": "dead", "prefix_rewrite": "/products", "timeout": timeout}}]
    out += [
        {"match": {"prefix": f"/api/{s}"},
         "route": {"cluster": s, "prefix_rewrite": f"/{s}", "timeout": timeout}}
        for s in harness.SERVICES
    ]
    out.append({"match": {"prefix": "/"}, "direct_response": {"status": 404, "body": {"inline_string": "no route"}}})
    return out


CONFIG = {
    "routes": [
        {"match": {"prefix": "/api/products"},
         "key": {"query_exclude": ["utm_source"], "headers": ["x-tenant"]},
         "vary_normalise": ["accept-language", "accept-encoding"],
         "refresh": {"cluster": "products", "strip_prefix": "/api/products", "add_prefix": "/products",
                     "timeout": "30s"}},
        {"match": {"prefix": "/api/orders"}, "set_cookie": "strip", "stale_if_error": "1h"},
    ],
    "max_total_bytes": 4 << 20,
    "max_entry_bytes": 64 << 10,
    "purge": {"path": "/_tollgate/cache/purge", "key_sha256": PURGE_SHA, "tag_header": "surrogate-key"},
    "targeted_fields": ["tollgate-cache-control", "cdn-cache-control"],
    "strip_targeted_fields": True,
}


@pytest.fixture(scope="module")
def envoy(services):
    _services[:] = [services]
    e = Envoy.start(filters=[("cache", CONFIG)], services=services, concurrency=2, routes=routes("2s"),
                    clusters=[harness.static_cluster("dead", harness.free_port(), timeout="0.25s")])
    yield e
    e.stop()


def hits(services, path, service="products"):
    return services.hits(service, path)


def cs(r):
    return r.header("cache-status") or ""


class Held:
    """`with Held(services, "/products/5") as hold:` requests to that path of a demo service wait
    at the origin (counted in `/stats` first) until the block ends; `hold.waiting()` says how
    many wait there now."""

    def __init__(self, services, path, service="products"):
        self.port, self.path = services.ports[service], path

    def _call(self, method, what):
        return harness.http(self.port, method, f"/{what}?path={self.path}").json()

    def waiting(self) -> int:
        return self._call("GET", "hold")["waiting"]

    def __enter__(self):
        self._call("POST", "hold")
        return self

    def __exit__(self, *exc):
        self._call("POST", "release")


# The origin's `Age` over the `max-age`: the entry is stale from the start, no waiting needed.
STALE = {"x-demo-age": "2"}


_n = [0]
_services = []


def fresh_id():
    """A product id whose paths no test (in this module or any other of the session) has asked
    the demo service for yet: the origin hit counts below start from zero."""
    while True:
        _n[0] += 1
        i = 100 + _n[0]
        assert i <= 1000, "out of demo product ids"
        if not _services or all(hits(_services[0], p) == 0 for p in
                                (f"/products/{i}", f"/products/echo/vary-{i}", f"/products/echo/star-{i}")):
            return i


# ---------------------------------------------------------------------------------------------


def test_miss_then_hit_with_age_and_cache_status(envoy, services):
    i = fresh_id()
    r = envoy.get(f"/api/products/{i}")
    assert r.status == 200 and r.json()["id"] == i, r
    assert cs(r) == "tollgate; fwd=uri-miss; stored", r
    aged = fresh_id()
    a = envoy.get(f"/api/products/{aged}", headers={"x-demo-age": "7"})
    assert cs(a) == "tollgate; fwd=uri-miss; stored", a
    r2 = envoy.get(f"/api/products/{i}")
    assert r2.status == 200 and r2.body == r.body, r2
    assert cs(r2).startswith("tollgate; hit; ttl="), r2
    assert int(r2.header("age")) >= 0, r2
    # the age the origin gave plus the time the entry was held
    a2 = envoy.get(f"/api/products/{aged}")
    assert "hit" in cs(a2) and int(a2.header("age")) >= 7 and int(cs(a2).split("ttl=")[1]) <= 53, a2
    assert r2.header("etag") == r.header("etag")
    assert r2.header("content-type") == "application/json"
    assert hits(services, f"/products/{i}") == 1
    # the normalised query: order does not matter, an excluded parameter is ignored
    envoy.get(f"/api/products/{i}?b=2&a=1")
    r3 = envoy.get(f"/api/products/{i}?a=1&utm_source=x&b=2")
    assert "hit" in cs(r3), r3
    assert hits(services, f"/products/{i}") == 2
    assert envoy.stat("tollgate.cache.hits") >= 2
    assert envoy.stat("tollgate.cache.stores") >= 2


def test_entry_stored_by_one_worker_is_served_by_the_other(envoy, services):
    i = fresh_id()
    before = {k: v for k, v in envoy.stats("downstream_cx_total").items() if ".worker_" in k}
    for _ in range(30):  # a new connection each time: Envoy spreads them over both workers
        r = envoy.get(f"/api/products/{i}")
        assert r.status == 200, r
    after = {k: v for k, v in envoy.stats("downstream_cx_total").items() if ".worker_" in k}
    used = [k for k in after if after[k] > before.get(k, 0)]
    assert len(used) == 2, (before, after)
    assert hits(services, f"/products/{i}") == 1


def http_date(offset: float) -> str:
    from email.utils import formatdate
    return formatdate(time.time() + offset, usegmt=True)


@pytest.mark.parametrize("cache_control, expires, outcome", [
    ("public, max-age=60", None, "hit"),
    ("s-maxage=60", None, "hit"),
    ("max-age=0, s-maxage=60", None, "hit"),          # a shared cache uses s-maxage
    ("x-no-directive", None, "hit"),                  # heuristic: 10% of the time since Last-Modified
    ("x-no-directive", "future", "hit"),              # Expires
    ("max-age=60", "past", "hit"),                    # max-age wins over Expires
    ("x-no-directive", "past", "revalidated"),
    ("x-no-directive", "0", "revalidated"),           # an invalid Expires is in the past
    ("max-age=0", None, "revalidated"),
    ("no-cache, max-age=60", None, "revalidated"),
    ("must-revalidate, max-age=0", None, "revalidated"),
    ("proxy-revalidate, max-age=60", None, "hit"),    # revalidated once stale only (RFC 9111 5.2.2.8)
    ("no-store, max-age=60", None, "not-stored"),
    ("private, max-age=60", None, "not-stored"),
])
def test_response_freshness_directives(cache_control, expires, outcome, envoy, services):
    i = fresh_id()
    knobs = {"x-demo-cache-control": cache_control}
    if expires:
        knobs["x-demo-expires"] = {"future": http_date(60), "past": http_date(-60)}.get(expires, expires)
    first = envoy.get(f"/api/products/{i}", headers=knobs)
    assert first.status == 200, first
    second = envoy.get(f"/api/products/{i}", headers=knobs)
    assert second.status == 200 and second.body == first.body, second
    if outcome == "hit":
        assert "stored" in cs(first) and cs(second).startswith("tollgate; hit; ttl="), (first, second)
        assert hits(services, f"/products/{i}") == 1
    elif outcome == "revalidated":
        assert "stored" in cs(first), first
        assert cs(second) == "tollgate; fwd=stale; fwd-status=304", second
        assert hits(services, f"/products/{i}") == 2
    else:
        assert "detail=not-storable" in cs(first) and cs(second) == cs(first), (first, second)


def test_no_heuristic_freshness_without_last_modified(envoy, services):
    i = fresh_id()
    knobs = {"x-demo-cache-control": "x-no-directive", "x-demo-last-modified": "none"}
    first = envoy.get(f"/api/products/{i}", headers=knobs)
    second = envoy.get(f"/api/products/{i}", headers=knobs)
    assert "stored" in cs(first), first
    assert cs(second) == "tollgate; fwd=stale; fwd-status=304", second


def test_concurrent_misses_are_collapsed_across_workers(envoy, services):
    from concurrent.futures import ThreadPoolExecutor
    i = fresh_id()
    active = "http.gateway.downstream_rq_active"
    with ThreadPoolExecutor(8) as pool:
        with Held(services, f"/products/{i}") as hold:
            base = envoy.stat(active)
            futures = [pool.submit(envoy.get, f"/api/products/{i}") for _ in range(8)]
            # all eight are in Envoy, the leaders (one per worker at most) wait at the origin
            harness.wait_for(lambda: envoy.stat(active) >= base + 8 and hold.waiting() >= 1, 10,
                             "eight requests in flight")
        rs = [f.result() for f in futures]
    assert all(r.status == 200 and r.body == rs[0].body for r in rs), rs
    # one fetch across both workers (#14.13); the others waited and were answered from it
    assert hits(services, f"/products/{i}") == 1, [cs(r) for r in rs]
    collapsed = [r for r in rs if cs(r).endswith("; collapsed")]
    assert len(collapsed) == 8 - 1, [cs(r) for r in rs]
    assert all(r.header("age") is not None for r in collapsed)


def test_misses_of_a_url_whose_answer_cannot_be_stored_go_upstream_together(envoy, services):
    """After a response that cannot be stored, concurrent misses of the URL are not collapsed
    (hit-for-miss): all of them reach the origin at once instead of waiting for one another."""
    from concurrent.futures import ThreadPoolExecutor
    i = fresh_id()
    path, private = f"/api/products/{i}", {"x-demo-cache-control": "private"}
    first = envoy.get(path, headers=private)
    assert cs(first) == "tollgate; fwd=uri-miss; detail=not-storable", first
    with ThreadPoolExecutor(4) as pool:
        with Held(services, f"/products/{i}") as hold:
            futures = [pool.submit(envoy.get, path, private) for _ in range(4)]
            harness.wait_for(lambda: hold.waiting() >= 4, 30, "four requests at the origin at once")
        rs = [f.result() for f in futures]
    assert all(r.status == 200 and cs(r) == cs(first) for r in rs), [(r.status, cs(r)) for r in rs]
    assert hits(services, f"/products/{i}") == 5


def test_client_conditional_requests_get_304_from_the_cache(envoy, services):
    i = fresh_id()
    r = envoy.get(f"/api/products/{i}")
    etag, lm = r.header("etag"), r.header("last-modified")
    assert etag and lm, r
    r304 = envoy.get(f"/api/products/{i}", headers={"if-none-match": etag})
    assert r304.status == 304 and r304.body == b"", r304
    assert r304.header("etag") == etag and "hit" in cs(r304)
    weak = envoy.get(f"/api/products/{i}", headers={"if-none-match": f'"nope", W/{etag}'})
    assert weak.status == 304, weak
    ims = envoy.get(f"/api/products/{i}", headers={"if-modified-since": lm})
    assert ims.status == 304, ims
    other = envoy.get(f"/api/products/{i}", headers={"if-none-match": '"other"'})
    assert other.status == 200 and other.body == r.body, other
    assert hits(services, f"/products/{i}") == 1


def test_head_is_answered_from_the_get_entry(envoy, services):
    i = fresh_id()
    r = envoy.get(f"/api/products/{i}")
    h = envoy.request("HEAD", f"/api/products/{i}")
    assert h.status == 200 and h.body == b"", h
    assert "hit" in cs(h) and h.header("etag") == r.header("etag"), h
    assert hits(services, f"/products/{i}") == 1


def test_vary_keeps_variants_apart(envoy, services):
    path = f"/api/products/echo/vary-{fresh_id()}"
    knobs = {"x-demo-cache-control": "public, max-age=60", "x-demo-vary": "Accept-Language"}
    seen = {}
    for lang in ("en", "fr"):
        r = envoy.get(path, headers={**knobs, "accept-language": lang})
        assert r.json()["headers"]["accept-language"] == lang
        assert "stored" in cs(r), r
        seen[lang] = r.body
    for lang in ("en", "fr", "en"):
        r = envoy.get(path, headers={**knobs, "accept-language": lang})
        assert "hit" in cs(r), r
        assert r.json()["headers"]["accept-language"] == lang, r
    r = envoy.get(path, headers={**knobs, "accept-language": "de"})
    assert "fwd=vary-miss" in cs(r) and r.json()["headers"]["accept-language"] == "de", r
    assert hits(services, path.replace("/api", "")) == 3
    # Vary: * never matches
    star = f"/api/products/echo/star-{fresh_id()}"
    for _ in range(2):
        r = envoy.get(star, headers={"x-demo-cache-control": "public, max-age=60", "x-demo-vary": "*"})
        assert "hit" not in cs(r), r
    assert hits(services, star.replace("/api", "")) == 2


def test_stale_entry_is_revalidated_and_refreshed_by_304(envoy, services):
    i = fresh_id()
    knobs = {"x-demo-cache-control": "public, max-age=1", **STALE}
    r = envoy.get(f"/api/products/{i}", headers=knobs)
    assert "stored" in cs(r)
    r2 = envoy.get(f"/api/products/{i}", headers={"x-demo-cache-control": "public, max-age=30"})
    assert r2.status == 200 and r2.body == r.body, r2
    assert cs(r2) == "tollgate; fwd=stale; fwd-status=304", r2
    assert r2.header("cache-control") == "public, max-age=30"
    r3 = envoy.get(f"/api/products/{i}")
    assert "hit" in cs(r3), r3
    assert hits(services, f"/products/{i}") == 2
    assert envoy.stat("tollgate.cache.revalidations") >= 1


def test_stale_while_revalidate_serves_stale_and_refreshes_once_in_background(envoy, services):
    i = fresh_id()
    r = envoy.get(f"/api/products/{i}",
                  headers={"x-demo-cache-control": "public, max-age=1, stale-while-revalidate=30", **STALE})
    assert "stored" in cs(r)
    refreshes = envoy.stat("tollgate.cache.refreshes")
    with Held(services, f"/products/{i}") as hold:
        # the origin holds every request to this path (the route times out at 2 s): a stale 200
        # did not go there, and the refresh stays in flight until the block ends
        for _ in range(5):
            s = envoy.get(f"/api/products/{i}")
            assert s.status == 200 and s.body == r.body, s
            assert "detail=stale-while-revalidate" in cs(s), s
        harness.wait_for(lambda: hold.waiting() == 1, 10, "the background refresh at the origin")
        assert hits(services, f"/products/{i}") == 2, "exactly one refresh"
    harness.wait_for(lambda: envoy.stat("tollgate.cache.refreshes") > refreshes, 10, "the refresh stored")
    assert hits(services, f"/products/{i}") == 2, "exactly one refresh"
    # the refresh (a 304 carrying the origin's default `max-age=60`) made the entry fresh
    f = envoy.get(f"/api/products/{i}")
    assert cs(f).startswith("tollgate; hit; ttl=") and "stale" not in cs(f), f
    assert int(cs(f).split("ttl=")[1]) > 50, f


def test_stale_if_error_serves_stale_on_5xx_and_timeout(envoy, services):
    i = fresh_id()
    r = envoy.get(f"/api/products/{i}", headers={"x-demo-cache-control": "public, max-age=1, stale-if-error=60",
                                                 **STALE})
    e = envoy.get(f"/api/products/{i}", headers={"x-demo-status": "503"})
    assert e.status == 200 and e.body == r.body, e
    assert cs(e) == "tollgate; fwd=stale; fwd-status=503; detail=stale-if-error", e
    with Held(services, f"/products/{i}"):  # the origin never answers within the route's 2 s
        t = envoy.get(f"/api/products/{i}")
    assert t.status == 200 and t.body == r.body, t
    assert "fwd-status=504" in cs(t), t
    d = envoy.get(f"/api/products/{i}", headers={"x-dead": "1"})  # connection refused
    assert d.status == 200 and d.body == r.body, d
    assert "fwd-status=503" in cs(d) and "stale-if-error" in cs(d), d
    # without stale-if-error the origin's error passes
    j = fresh_id()
    envoy.get(f"/api/products/{j}", headers={"x-demo-cache-control": "public, max-age=1", **STALE})
    e = envoy.get(f"/api/products/{j}", headers={"x-demo-status": "503"})
    assert e.status == 503, e
    # the route's default window (orders rule: stale_if_error 1h) when the response has none
    o = envoy.get("/api/orders/7", headers={"x-demo-cache-control": "public, max-age=1", **STALE})
    assert o.status == 200 and "stored" in cs(o), o
    e = envoy.get("/api/orders/7", headers={"x-demo-status": "500"})
    assert e.status == 200 and e.body == o.body and "stale-if-error" in cs(e), e


def test_authorization_is_not_stored_unless_the_response_allows_it(envoy, services):
    i = fresh_id()
    auth = {"authorization": "Bearer alice", "x-demo-cache-control": "max-age=60"}
    r = envoy.get(f"/api/products/{i}", headers=auth)
    assert "detail=not-storable" in cs(r), r
    r = envoy.get(f"/api/products/{i}")  # another client, no credentials
    assert "hit" not in cs(r)
    assert hits(services, f"/products/{i}") == 2
    j = fresh_id()
    r = envoy.get(f"/api/products/{j}", headers={"authorization": "Bearer alice",
                                                 "x-demo-cache-control": "public, max-age=60"})
    assert "stored" in cs(r), r
    assert "hit" in cs(envoy.get(f"/api/products/{j}"))
    # private responses (the users service) are never stored
    for _ in range(2):
        u = envoy.get("/api/users/3")
        assert "hit" not in cs(u) and u.header("cache-control") == "private, max-age=30"
    assert "Bearer alice" not in envoy.log()


def test_set_cookie_responses_are_not_stored_unless_configured(envoy, services):
    i = fresh_id()
    knobs = {"x-demo-cache-control": "public, max-age=60", "x-demo-set-cookie": "session=alice"}
    r = envoy.get(f"/api/products/{i}", headers=knobs)
    assert r.header("set-cookie") == "session=alice" and "detail=set-cookie" in cs(r), r
    r = envoy.get(f"/api/products/{i}")
    assert "hit" not in cs(r) and r.header("set-cookie") is None
    # the orders rule strips the cookie and stores
    o = envoy.get("/api/orders/9", headers=knobs)
    assert o.header("set-cookie") == "session=alice" and "stored" in cs(o), o
    o2 = envoy.get("/api/orders/9")
    assert "hit" in cs(o2) and o2.header("set-cookie") is None, o2


def test_request_directives(envoy, services):
    i = fresh_id()
    r = envoy.get(f"/api/products/{i}", headers={"cache-control": "only-if-cached"})
    assert r.status == 504 and "only-if-cached" in cs(r), r
    envoy.get(f"/api/products/{i}", headers={"x-demo-age": "5"})
    r = envoy.get(f"/api/products/{i}", headers={"cache-control": "max-age=0"})
    assert "fwd=" in cs(r) and "hit" not in cs(r), r
    r = envoy.get(f"/api/products/{i}", headers={"cache-control": "no-cache"})
    assert cs(r).startswith("tollgate; fwd=request"), r
    r = envoy.get(f"/api/products/{i}", headers={"cache-control": "min-fresh=3600"})
    assert "hit" not in cs(r), r
    r = envoy.get(f"/api/products/{i}", headers={"cache-control": "only-if-cached"})
    assert r.status == 200 and "hit" in cs(r), r
    r = envoy.get(f"/api/products/{i}", headers={"cache-control": "no-store"})
    assert r.status == 200


def test_configured_key_headers_separate_entries(envoy, services):
    i = fresh_id()
    for tenant in ("a", "b", "a", "b"):
        r = envoy.get(f"/api/products/{i}", headers={"x-tenant": tenant})
        assert r.status == 200
    assert hits(services, f"/products/{i}") == 2
    assert "hit" in cs(envoy.get(f"/api/products/{i}", headers={"x-tenant": "b"}))
    assert "fwd=vary-miss" in cs(envoy.get(f"/api/products/{i}"))  # no tenant: its own entry


def test_unsafe_methods_invalidate_the_url_on_success(envoy, services):
    i = fresh_id()
    envoy.get(f"/api/products/{i}")
    assert "hit" in cs(envoy.get(f"/api/products/{i}"))
    p = envoy.request("POST", f"/api/products/{i}", body="{}", headers={"x-demo-status": "500"})
    assert p.status == 500 and cs(p) == "tollgate; fwd=method"
    assert "hit" in cs(envoy.get(f"/api/products/{i}")), "a failed POST invalidates nothing"
    p = envoy.request("PUT", f"/api/products/{i}", body="{}")
    assert p.status == 200, p
    r = envoy.get(f"/api/products/{i}")
    assert cs(r) == "tollgate; fwd=uri-miss; stored", r
    assert envoy.stat("tollgate.cache.invalidations") >= 1


def test_purge_one_url_and_a_prefix(envoy, services):
    a, b = fresh_id(), fresh_id()
    for i in (a, b):
        envoy.get(f"/api/products/{i}")
        assert "hit" in cs(envoy.get(f"/api/products/{i}"))
    url = f"/_tollgate/cache/purge?url=/api/products/{a}"
    r = envoy.request("POST", url)
    assert r.status == 401 and r.header("content-type") == "application/problem+json", r
    r = envoy.request("POST", url, headers={"x-tollgate-purge-key": "wrong"})
    assert r.status == 403, r
    r = envoy.request("POST", url, headers={"x-tollgate-purge-key": PURGE_KEY})
    assert r.status == 200 and r.json()["purged"] == f"/api/products/{a}", r
    assert "uri-miss" in cs(envoy.get(f"/api/products/{a}"))
    assert "hit" in cs(envoy.get(f"/api/products/{b}"))
    r = envoy.request("PURGE", "/_tollgate/cache/purge?prefix=/api/products/",
                      headers={"x-tollgate-purge-key": PURGE_KEY})
    assert r.status == 200 and r.json()["kind"] == "prefix", r
    assert "uri-miss" in cs(envoy.get(f"/api/products/{b}"))
    assert "hit" in cs(envoy.get(f"/api/products/{b}"))
    assert PURGE_KEY not in envoy.log()


def test_memory_stays_under_the_bound_with_a_stream_of_distinct_urls(services, envoy_factory):
    config = {"routes": [{"match": {"prefix": "/api/products"}}],
              "max_total_bytes": 65536, "max_entry_bytes": 8192, "ways": 2}
    envoy = envoy_factory(filters=[("cache", config)], services=services, concurrency=2)
    bound = 65536
    for n in range(60):
        r = envoy.get(f"/api/products/5?n={n}&size=3000")
        assert r.status == 200 and abs(len(r.body) - 3000) < 50, r
        assert "stored" in cs(r), r
    # every pass of the usage scan reports bounded numbers (each set is bounded at every moment)
    harness.wait_for(lambda: envoy.stat("tollgate.cache.entries") > 0, 10, "the usage gauges")
    held, entries = envoy.stat("tollgate.cache.bytes"), envoy.stat("tollgate.cache.entries")
    assert 0 < held <= bound, held
    assert 0 < entries <= 8, entries
    assert envoy.stat("tollgate.cache.stores") == 60
    assert envoy.stat("tollgate.cache.evictions") >= 60 - 8
    # the most recent URL is still there
    assert "hit" in cs(envoy.get("/api/products/5?n=59&size=3000"))
    # larger than an entry: streams through whole, never stored
    base = hits(services, "/products/6")
    for _ in range(2):
        big = envoy.get("/api/products/6?size=50000")
        assert big.status == 200 and abs(len(big.body) - 50000) < 50 and json.loads(big.body)["id"] == 6
        # the demo sends this one chunked (no Content-Length): capture stops at the limit
        assert "hit" not in cs(big) and "stored" not in cs(big), big
    assert hits(services, "/products/6") == base + 2
    assert envoy.stat("tollgate.cache.too_large") >= 2
    # with a Content-Length over the limit, the header says so at once
    r = envoy.get("/api/products/7?size=9000")
    assert r.header("content-length") and "detail=too-large" in cs(r), r


def test_empty_configuration_passes_traffic_untouched(services, envoy_factory):
    envoy = envoy_factory(filters=[("cache", {})], services=services)
    for _ in range(2):
        r = envoy.get("/api/products/1")
        assert r.status == 200 and r.header("cache-status") is None
    # one counter per request, its outcome's: no rule matched
    assert envoy.stat("tollgate.cache.uncached") == 2


@pytest.mark.parametrize("config, field", [
    ({"ways": 0}, "ways"),
    ({"purge": {"path": "/p", "key_sha256": "not-hex"}}, "purge.key_sha256"),
    ({"routes": [{"match": {"prefix": "/a"}, "key": {"headers": ["authorization"]}}]}, "routes[0].key.headers[0]"),
])
def test_bad_configuration_is_refused_with_one_line(config, field, services, envoy_factory):
    envoy = envoy_factory(filters=[("cache", config)], services=services, expect_failure=True)
    lines = harness.config_error_lines(envoy, "cache")
    assert len(lines) == 1 and f"field `{harness.config_field('cache', field)}`" in lines[0], envoy.log_tail()


# --- RFC 9111 to the letter (#14 items 1-7) -------------------------------------------------


def rfc850_date(offset: float) -> str:
    return time.strftime("%A, %d-%b-%y %H:%M:%S GMT", time.gmtime(time.time() + offset))


def asctime_date(offset: float) -> str:
    t = time.gmtime(time.time() + offset)
    return time.strftime("%a %b ", t) + f"{t.tm_mday:2d}" + time.strftime(" %H:%M:%S %Y", t)


@pytest.mark.parametrize("cache_control, route", [
    ("public, max-age=1, must-revalidate, stale-if-error=60", "products"),
    ("public, max-age=1, proxy-revalidate, stale-if-error=60", "products"),
    ("public, no-cache, stale-if-error=60", "products"),
    ("public, s-maxage=1, stale-if-error=60", "products"),
    ("public, max-age=1, Must-Revalidate", "orders"),   # the rule's stale_if_error 1h neither
])
def test_stale_if_error_never_where_the_response_forbids_stale(cache_control, route, envoy, services):
    i = fresh_id()
    path = f"/api/{route}/{i}"
    r = envoy.get(path, headers={"x-demo-cache-control": cache_control, **STALE})
    assert "stored" in cs(r), r
    e = envoy.get(path, headers={"x-demo-status": "503"})
    assert e.status == 503 and "stale-if-error" not in cs(e), e


@pytest.mark.parametrize("knobs, request_cc, outcome", [
    ({"x-demo-cache-control": "MaX-AgE=60"}, None, "hit"),                     # #14.2
    ({"x-demo-cache-control": "No-CaChE, MaX-AgE=60"}, None, "revalidated"),
    ({"x-demo-cache-control": "Private, max-age=60"}, None, "not-stored"),
    ({"x-demo-cache-control": "NO-STORE, max-age=60"}, None, "not-stored"),
    ({}, "No-Cache", "request"),
    ({"x-demo-cache-control": "max-age=3600", "x-demo-age": "7200, 0"}, None, "revalidated"),   # #14.3
    ({"x-demo-cache-control": "max-age=3600", "x-demo-age": "0", "x-demo-header": "age: 7200"}, None, "hit"),
    ({"x-demo-cache-control": "max-age=3600", "x-demo-age": "abc"}, None, "hit"),   # ignored (5.1)
    ({"x-demo-cache-control": "max-age=3600", "x-demo-age": "-7200"}, None, "hit"),
    ({"x-demo-cache-control": "x-no-directive", "x-demo-expires": "rfc850"}, None, "hit"),   # #14.4
    ({"x-demo-cache-control": "x-no-directive", "x-demo-expires": "asctime"}, None, "hit"),
    ({"x-demo-cache-control": "x-no-directive", "x-demo-expires": "doubled"}, None, "revalidated"),
    ({"x-demo-cache-control": "max-age=60", "x-demo-date": "rfc850-past"}, None, "revalidated"),
    ({"x-demo-cache-control": "x-no-directive", "x-demo-last-modified": "asctime-past"}, None, "hit"),
])
def test_directive_age_and_date_parsing(knobs, request_cc, outcome, envoy, services):
    dates = {"rfc850": rfc850_date(600), "asctime": asctime_date(600),
             "doubled": http_date(600).replace(" GMT", "  GMT"),
             "rfc850-past": rfc850_date(-3600), "asctime-past": asctime_date(-30 * 86400)}
    knobs = {k: dates.get(v, v) for k, v in knobs.items()}
    i = fresh_id()
    first = envoy.get(f"/api/products/{i}", headers=knobs)
    assert first.status == 200, first
    second = envoy.get(f"/api/products/{i}", headers={"cache-control": request_cc} if request_cc else {})
    if outcome == "hit":
        assert "stored" in cs(first) and cs(second).startswith("tollgate; hit; ttl="), (first, second)
    elif outcome == "revalidated":
        assert "stored" in cs(first) and cs(second) == "tollgate; fwd=stale; fwd-status=304", (first, second)
    elif outcome == "request":
        assert cs(second).startswith("tollgate; fwd=request"), second
    else:
        assert "detail=not-storable" in cs(first) and "hit" not in cs(second), (first, second)


def test_304_and_head_freshen_the_stored_headers(envoy, services):
    i = fresh_id()
    r = envoy.get(f"/api/products/{i}", headers={"x-demo-cache-control": "public, max-age=1", **STALE})
    assert "stored" in cs(r), r
    # #14.5: a 304 replaces every stored field it carries (not only the freshness ones)
    v = envoy.get(f"/api/products/{i}", headers={"x-demo-header": "x-version: 2",
                                                 "x-demo-cache-control": "public, max-age=1", **STALE})
    assert cs(v) == "tollgate; fwd=stale; fwd-status=304" and v.header("x-version") == "2", v
    h = envoy.get(f"/api/products/{i}")
    assert h.header("x-version") == "2" and "fwd-status=304" in cs(h), h
    # a HEAD 200 with the same validators freshens the stored GET response (RFC 9111 4.3.5)
    head = envoy.request("HEAD", f"/api/products/{i}", headers={
        "cache-control": "no-cache", "x-demo-conditional": "ignore", "x-demo-cache-control": "public, max-age=300"})
    assert head.status == 200 and "detail=head-freshened" in cs(head), head
    g = envoy.get(f"/api/products/{i}")
    assert cs(g).startswith("tollgate; hit; ttl=") and g.header("cache-control") == "public, max-age=300", g
    assert g.body == r.body
    assert hits(services, f"/products/{i}") == 4


def test_if_modified_since_uses_date_without_last_modified(envoy, services):
    i = fresh_id()
    r = envoy.get(f"/api/products/{i}", headers={"x-demo-last-modified": "none"})
    assert "stored" in cs(r) and r.header("last-modified") is None and r.header("date"), r
    later = envoy.get(f"/api/products/{i}", headers={"if-modified-since": rfc850_date(60)})
    assert later.status == 304 and "hit" in cs(later), later
    earlier = envoy.get(f"/api/products/{i}", headers={"if-modified-since": asctime_date(-3600)})
    assert earlier.status == 200 and earlier.body == r.body, earlier


def test_per_hop_and_proxy_added_headers_are_not_replayed(envoy, services):
    i = fresh_id()
    r = envoy.get(f"/api/products/{i}", headers={"x-demo-header": "proxy-connection: keep-alive"})
    assert r.header("x-envoy-upstream-service-time") is not None, r
    h = envoy.get(f"/api/products/{i}")
    assert "hit" in cs(h), h
    assert h.header("x-envoy-upstream-service-time") is None and h.header("proxy-connection") is None, h


def test_responses_that_can_never_be_reused_are_not_stored(envoy, services):
    i = fresh_id()
    knobs = {"x-demo-cache-control": "public, max-age=0", "x-demo-etag": "none", "x-demo-last-modified": "none"}
    r = envoy.get(f"/api/products/{i}", headers=knobs)
    assert r.status == 200 and "detail=not-reusable" in cs(r), r
    assert envoy.get(f"/api/products/{i}", headers=knobs).status == 200
    assert hits(services, f"/products/{i}") == 2
    assert "detail=not-reusable" in cs(envoy.get(f"/api/products/{i}", headers={"x-demo-expires": "0", **knobs}))


# --- Features (#14 items 8-13) ---------------------------------------------------------------


@pytest.mark.parametrize("status, knobs, stored", [
    ("404", {}, True),                                                  # the demo's public, max-age=60
    ("410", {"x-demo-cache-control": "max-age=30"}, True),
    ("503", {"x-demo-cache-control": "max-age=30"}, True),              # negative caching
    ("500", {"x-demo-cache-control": "x-no-directive"}, False),         # no explicit freshness
    ("404", {"x-demo-cache-control": "x-no-directive",                  # heuristic, 404 allows it
             "x-demo-header": "last-modified: Thu, 01 Jan 2026 00:00:00 GMT"}, True),
])
def test_status_codes_and_negative_caching(status, knobs, stored, envoy, services):
    i = fresh_id()
    first = envoy.get(f"/api/products/{i}", headers={"x-demo-status": status, **knobs})
    assert first.status == int(status), first
    second = envoy.get(f"/api/products/{i}")
    if stored:
        assert "stored" in cs(first), first
        # served from the cache with the origin's status
        assert second.status == int(status) and cs(second).startswith("tollgate; hit; ttl="), second
        assert second.body == first.body
        assert hits(services, f"/products/{i}") == 1
    else:
        assert "stored" not in cs(first) and "hit" not in cs(second), (first, second)


@pytest.mark.parametrize("cache_control, targeted, outcome", [
    ("public, max-age=0", "cdn-cache-control: max-age=600", "hit"),
    ("private", "cdn-cache-control: public, max-age=600", "hit"),       # Cache-Control ignored
    ("public, max-age=600", "tollgate-cache-control: no-store", "not-stored"),
    ("public, max-age=0", "cdn-cache-control: Max-Age=600", "revalidated"),  # invalid: ignored
])
def test_targeted_cache_control_takes_precedence_and_is_stripped(cache_control, targeted, outcome, envoy,
                                                                 services):
    i = fresh_id()
    knobs = {"x-demo-cache-control": cache_control, "x-demo-header": targeted}
    first = envoy.get(f"/api/products/{i}", headers=knobs)
    second = envoy.get(f"/api/products/{i}", headers=knobs)
    for r in (first, second):
        assert r.status == 200 and r.header("cache-control") == cache_control, r
        name = targeted.split(":")[0]
        assert r.header(name) is None, r  # strip_targeted_fields
    if outcome == "hit":
        assert "stored" in cs(first) and cs(second).startswith("tollgate; hit; ttl="), (first, second)
        assert int(cs(second).split("ttl=")[1]) > 500, second
    elif outcome == "revalidated":
        assert "stored" in cs(first) and cs(second) == "tollgate; fwd=stale; fwd-status=304", (first, second)
    else:
        assert "detail=not-storable" in cs(first) and "hit" not in cs(second), (first, second)


def test_single_range_from_a_stored_complete_response(envoy, services):
    i = fresh_id()
    full = envoy.get(f"/api/products/{i}")
    assert "stored" in cs(full), full
    n, etag, lm = len(full.body), full.header("etag"), full.header("last-modified")

    def ask(**headers):
        return envoy.get(f"/api/products/{i}", headers={k.replace("_", "-"): v for k, v in headers.items()})

    r = ask(range="bytes=0-4")
    assert r.status == 206 and r.body == full.body[:5] and r.header("content-range") == f"bytes 0-4/{n}", r
    assert "hit" in cs(r), r
    r = ask(range="bytes=-3")
    assert r.status == 206 and r.body == full.body[-3:] and r.header("content-range") == f"bytes {n - 3}-{n - 1}/{n}", r
    r = ask(range=f"bytes={n}-")
    assert r.status == 416 and r.header("content-range") == f"bytes */{n}" and r.body == b"", r
    assert ask(range="bytes=0-1, 3-4").status == 200                              # several: whole
    assert ask(range="bytes=1-2", if_range=etag).status == 206
    assert ask(range="bytes=1-2", if_range=lm).status == 206
    r = ask(range="bytes=1-2", if_range='"other"')
    assert r.status == 200 and r.body == full.body, r
    assert hits(services, f"/products/{i}") == 1


def test_vary_values_are_normalised_where_configured(envoy, services):
    knobs = {"x-demo-cache-control": "public, max-age=60", "x-demo-vary": "Accept-Language"}
    # the products rule normalises Accept-Language: case, spaces, order, q=0
    path = f"/api/products/echo/norm-{fresh_id()}"
    r = envoy.get(path, headers={**knobs, "accept-language": "en-US, fr;q=0.5"})
    assert "stored" in cs(r), r
    for same in ("FR;q=0.5 ,  en-us", "en-us,fr;q=0.5,de;q=0", "en-US, fr;q=0.50"):
        h = envoy.get(path, headers={**knobs, "accept-language": same})
        assert "hit" in cs(h), (same, h)
    assert "fwd=vary-miss" in cs(envoy.get(path, headers={**knobs, "accept-language": "fr, en-us;q=0.5"}))
    # the orders rule does not: another spelling is another variant
    other = f"/api/orders/echo/norm-{fresh_id()}"
    r = envoy.get(other, headers={**knobs, "accept-language": "en-US, fr;q=0.5"})
    assert "stored" in cs(r), r
    assert "fwd=vary-miss" in cs(envoy.get(other, headers={**knobs, "accept-language": "FR;q=0.5 ,  en-us"}))


def test_tag_purge_reaches_every_worker(envoy, services):
    tagged = {"red-blue": "red blue", "blue": "blue,green", "green": "green"}
    ids = {name: fresh_id() for name in tagged}
    for name, tags in tagged.items():
        r = envoy.get(f"/api/products/{ids[name]}", headers={"x-demo-header": f"surrogate-key: {tags}"})
        assert "stored" in cs(r), r
    r = envoy.request("POST", "/_tollgate/cache/purge?tag=blue", headers={"x-tollgate-purge-key": PURGE_KEY})
    assert r.status == 200 and r.json() == {"purged": "blue", "kind": "tag"}, r
    # a new connection each time: both workers see the purge at once
    for _ in range(6):
        for name in tagged:
            envoy.get(f"/api/products/{ids[name]}")
    assert hits(services, f"/products/{ids['green']}") == 1
    assert hits(services, f"/products/{ids['red-blue']}") == 2
    assert hits(services, f"/products/{ids['blue']}") == 2
    bad = envoy.request("POST", "/_tollgate/cache/purge?tag=a%20b", headers={"x-tollgate-purge-key": PURGE_KEY})
    assert bad.status == 400, bad
    both = envoy.request("POST", "/_tollgate/cache/purge?tag=a&url=/x", headers={"x-tollgate-purge-key": PURGE_KEY})
    assert both.status == 400, both


# --- JSON Schema ------------------------------------------------------------------------------


def schema():
    from harness import schema_validator
    return schema_validator("cache")


def documented_example() -> dict:
    text = (ROOT / "docs" / "filters" / "cache.md").read_text()
    block = text.split("### Example (the bundled configuration)", 1)[1].split("```json", 1)[1].split("```", 1)[0]
    return json.loads(block)


def test_schema_accepts_the_documented_example_and_the_bundled_config():
    from harness import bundled_filter_configs
    v = schema()
    bundled = bundled_filter_configs()["cache"]
    assert documented_example() == bundled, "the documented example is the bundled configuration"
    for config in (bundled, CONFIG, {}, {"routes": [{"match": {"prefix": "/a"}}]}):
        errors = [e.message for e in v.iter_errors(config)]
        assert not errors, (config, errors)


@pytest.mark.parametrize("config", [
    {"ways": 0},
    {"ways": 17},
    {"max_entry_bytes": 10},
    {"purge": {"path": "/p", "key_sha256": "abc"}},
    {"purge": {"path": "p", "key_sha256": PURGE_SHA}},
    {"purge": {"path": "/p"}},
    {"routes": [{"key": {"headers": ["authorization"]}}]},
    {"routes": [{"key": {"headers": ["bad header"]}}]},
    {"routes": [{"key": {"query_exclude": [""]}}]},
    {"routes": [{"set_cookie": "keep"}]},
    {"routes": [{"stale_if_error": "soon"}]},
    {"routes": [{"refresh": {"cluster": ""}}]},
    {"routes": [{"refresh": {"cluster": "c", "strip_prefix": "x"}}]},
    {"routes": [{"key": {"nope": 1}}]},
    {"targeted_fields": ["Cache-Control"]},
    {"routes": [{"vary_normalise": ["x-tenant"]}]},
    {"targeted_fields": ["bad header"]},
])
def test_schema_refuses_what_the_filter_refuses(config):
    assert not schema().is_valid(config), config
