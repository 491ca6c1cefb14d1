"""tollgate.auth on a real Envoy: JWT (remote JWKS, OIDC discovery, rotation, every refusal),
API keys, introspection, authorization, identity forwarding, failure modes, the bundled demo.

Tokens are minted with the `mint-token` example and the DEMO-ONLY keys of envoy/demo-keys/;
the identity provider is tests/auth_helpers.Idp (JWKS, discovery, introspection) on a free port.
"""

import hashlib
import json
import threading
import time

import pytest

import harness
from auth_helpers import ISSUER, KEYS, Idp, b64, build_mint, demo_claims, hs256, mint, public_jwks, unb64
from harness import Envoy, free_port, static_cluster

HS_SECRET = b"0123456789abcdef0123456789abcdef"


def sha(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


@pytest.fixture(scope="module")
def minted():
    build_mint()
    return mint


@pytest.fixture(scope="module")
def idp():
    i = Idp()
    i.set("/jwks", public_jwks())
    i.set("/rot-jwks", public_jwks("demo-es256"))
    i.set("/.well-known/openid-configuration",
          json.dumps({"issuer": "https://oidc.local", "jwks_uri": f"http://127.0.0.1:{i.port}/oidc-jwks"}).encode())
    i.set("/oidc-jwks", public_jwks("demo-rs256"))
    i.set("/slow-jwks", public_jwks(), hold=True)  # answers only after `release()`
    i.set("/garbage-jwks", b"this is not JSON <html>", ctype="text/plain")
    i.set("/lazy-jwks", public_jwks(), hold=True)
    i.set("/burst-jwks", public_jwks("demo-es256"))
    i.set("/short-jwks", public_jwks("demo-es256"))
    yield i
    i.stop()


def envoy_config(services, idp, auth_config, max_headers_kb=None, extra_clusters=()):
    port, admin = free_port(), free_port()
    clusters = [static_cluster(n, p) for n, p in services.ports.items()]
    clusters.append(static_cluster("idp", idp.port))
    clusters += list(extra_clusters)
    cfg = harness.bootstrap(port, admin, [harness.wasm_filter("auth", auth_config)], clusters)
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    if max_headers_kb:
        # Envoy's own limit (60 KB) would answer 431 before the filter sees a 100 KB token.
        hcm["max_request_headers_kb"] = max_headers_kb
    return cfg


def main_auth_config():
    return {
        "providers": [
            {"name": "demo", "issuer": ISSUER, "audiences": ["tollgate-demo"],
             "algorithms": ["ES256", "RS256", "PS256", "ES384", "EdDSA"],
             "remote_jwks": {"cluster": "idp", "path": "/jwks", "timeout": "1s", "refetch_interval": "1s"},
             "claim_headers": [{"claim": "org.id", "header": "x-org-id"}, {"claim": "roles", "header": "x-roles"},
                               {"claim": "org", "header": "x-org"}],
             "payload_header": "x-jwt-payload", "plan_claim": "plan", "max_lifetime": "1d"},
            {"name": "rot", "issuer": "https://rotating.local", "algorithms": ["ES256"],
             "remote_jwks": {"cluster": "idp", "path": "/rot-jwks", "timeout": "1s", "refetch_interval": "1s"}},
            {"name": "burst", "issuer": "https://burst.local", "algorithms": ["ES256"],
             "remote_jwks": {"cluster": "idp", "path": "/burst-jwks", "timeout": "1s", "refetch_interval": "1h"}},
            {"name": "oidc", "issuer": "https://oidc.local", "algorithms": ["RS256"],
             "remote_jwks": {"cluster": "idp", "discovery_path": "/.well-known/openid-configuration"}},
            {"name": "short", "issuer": "https://short.local", "algorithms": ["ES256"],
             "remote_jwks": {"cluster": "idp", "path": "/short-jwks", "cache_duration": "2s"}},
            {"name": "hs", "issuer": "https://hs.local", "algorithms": ["HS256"], "typ": "at+jwt",
             "jwks": {"keys": [{"kty": "oct", "kid": "hs1", "k": b64(HS_SECRET)}]}},
        ],
        "api_keys": {
            "from": [{"header": "x-api-key"}, {"query": "api_key"}],
            "keys": [
                {"sha256": sha("demo-key-pro"), "consumer": "acme", "metadata": {"plan": "pro", "region": "eu"}},
                {"sha256": sha("demo-key-expired"), "consumer": "old", "expires": "2020-01-01T00:00:00Z"},
            ],
        },
        # Cached answers outlive the test however slow the machine (the cache's own lifetimes
        # are unit tests).
        "introspection": {"cluster": "idp", "path": "/introspect", "timeout": "1s", "plan_claim": "plan",
                          "cache_duration": "1h", "negative_cache_duration": "1h"},
        "token_sources": [{"header": "authorization", "prefix": "Bearer "}, {"header": "x-token", "prefix": "Token "},
                          {"query": "access_token"}, {"cookie": "session"}],
        "remove_credential": True,
        "routes": [
            {"match": {"prefix": "/api/products"}, "disabled": True},
            {"match": {"prefix": "/api/users/echo/admin"}, "claims": [{"claim": "roles", "any_of": ["admin"]}]},
            {"match": {"prefix": "/api/users/echo/opt"}, "requirement": "optional"},
            {"match": {"prefix": "/api/users/echo/maybe"}, "requirement": "allow_missing"},
            {"match": {"prefix": "/api/users/echo/acme-only"}, "consumers": ["acme"]},
            {"match": {"prefix": "/api/orders"}, "scopes": ["orders:read"]},
            {"match": {"prefix": "/api/users"}},
        ],
    }


@pytest.fixture(scope="module")
def gw(services, idp, minted):
    envoy = Envoy.start(config=envoy_config(services, idp, main_auth_config(), max_headers_kb=200), concurrency=2)
    harness.wait_for(lambda: envoy.stat("tollgate.auth.jwks_fetches") >= 1, 10, "the first key fetch")
    yield envoy
    envoy.stop()


def bearer(token):
    return {"authorization": f"Bearer {token}"}


def echo_headers(r):
    assert r.status == 200, r
    return r.json()["headers"]


def assert_refused(r, reason, token=None, status=401):
    assert r.status == status, r
    assert r.header("content-type") == "application/problem+json", r
    body = r.json()
    assert body["reason"] == reason, body
    assert body["status"] == status
    if token:
        assert token not in r.text and token[-20:] not in r.text, "the reply echoes the token"
    return body


# ---------------------------------------------------------------------------------------------
# JWT


@pytest.mark.parametrize("kid", ["demo-es256", "demo-rs256", "demo-ps256", "demo-es384", "demo-eddsa"])
def test_valid_token_of_each_algorithm_from_remote_jwks(gw, minted, kid):
    r = gw.get("/api/users/echo/x", headers=bearer(minted(kid=kid, sub=f"user-{kid}")))
    h = echo_headers(r)
    assert h["x-tollgate-consumer"] == f"user-{kid}"
    assert "authorization" not in h, "remove_credential: the token must not reach the service"


def test_claims_are_forwarded_as_headers(gw, minted):
    token = minted(sub="alice", claims={"org": {"id": "o-1", "name": "Org"}, "roles": ["dev", "ops"], "plan": "gold"})
    h = echo_headers(gw.get("/api/users/echo/claims", headers=bearer(token)))
    assert h["x-org-id"] == "o-1"
    assert h["x-roles"] == "dev,ops"
    assert json.loads(h["x-org"]) == {"id": "o-1", "name": "Org"}
    assert h["x-tollgate-plan"] == "gold"
    assert json.loads(unb64(h["x-jwt-payload"]))["sub"] == "alice"
    assert h["x-jwt-payload"] == token.split(".")[1]


def test_forged_identity_headers_are_removed(gw, minted):
    forged = {"x-tollgate-consumer": "mallory", "x-tollgate-plan": "enterprise", "x-org-id": "evil",
              "x-jwt-payload": "e30", "x-tollgate-region": "us"}
    h = echo_headers(gw.get("/api/users/echo/x", headers={**bearer(minted(sub="alice")), **forged}))
    assert h["x-tollgate-consumer"] == "alice"
    assert "x-org-id" not in h and "x-tollgate-region" not in h
    assert "x-tollgate-plan" not in h
    # Anonymous on an optional route: every forged header is gone too.
    h = echo_headers(gw.get("/api/users/echo/opt", headers=forged))
    for name in forged:
        assert name not in h, name
    assert gw.stat("tollgate.auth.forged_headers_removed") >= 9


def tamper_signature(t):
    head, payload, sig = t.split(".")
    mid = len(sig) // 2
    sig = sig[:mid] + ("A" if sig[mid] != "A" else "B") + sig[mid + 1:]
    return f"{head}.{payload}.{sig}"


def tamper_payload(t):
    head, _, sig = t.split(".")
    return f"{head}.{b64(json.dumps(demo_claims(sub='admin')).encode())}.{sig}"


def refused_cases(minted):
    pub = json.loads(public_jwks("demo-es256"))["keys"][0]
    none_token = b64(b'{"alg":"none","typ":"JWT"}') + "." + b64(json.dumps(demo_claims()).encode()) + "."
    return [
        ("alg none", none_token, "alg_not_allowed"),
        ("alg not in allowlist", minted(header={"alg": "ES512"}), "alg_not_allowed"),
        # HS256 signed with the public key's bytes: HMAC is not allowed for this provider, and
        # no asymmetric key verifies an HMAC anyway.
        ("key confusion", hs256({"alg": "HS256", "kid": "demo-es256"}, demo_claims(),
                                json.dumps(pub).encode()), "alg_not_allowed"),
        ("embedded jwk", minted(header={"jwk": pub}), "embedded_key"),
        ("jku", minted(header={"jku": "http://evil.example/jwks.json"}), "embedded_key"),
        ("x5u", minted(header={"x5u": "http://evil.example/cert.pem"}), "embedded_key"),
        ("crit", minted(header={"crit": ["exp"]}), "crit"),
        ("tampered signature", tamper_signature(minted()), "bad_signature"),
        ("tampered payload", tamper_payload(minted()), "bad_signature"),
        ("expired", minted(ttl=-300), "expired"),
        ("not yet valid", minted(nbf_in=600), "not_yet_valid"),
        ("issued in the future", minted(iat_in=600, ttl=1200), "issued_in_future"),
        ("lifetime too long", minted(ttl=3 * 86400), "lifetime_too_long"),
        ("no exp", minted(no_exp=True), "missing_exp"),
        ("wrong issuer", minted(iss="https://evil.example"), "unknown_issuer"),
        ("wrong audience", minted(aud="someone-else"), "wrong_audience"),
        ("malformed base64", "eyJhbGciOiJFUzI1NiJ9.e$30.c2ln", "malformed"),
        ("malformed JSON", b64(b'{"alg": ES256') + "." + b64(b"{}") + ".c2ln", "malformed"),
        ("payload not JSON", b64(b'{"alg":"ES256"}') + "." + b64(b"hello") + ".c2ln", "malformed"),
        ("JSON serialization", '{"payload":"e30","signatures":[]}', "malformed"),
        ("100 KB token", "eyJ" + "a" * 100_000, "token_too_large"),
        ("wrong typ (RFC 8725)", hs256({"alg": "HS256", "typ": "JWT"}, demo_claims(iss="https://hs.local"), HS_SECRET),
         "wrong_type"),
    ]


def test_every_refused_token(gw, minted):
    """Every refusal: 401, problem+json naming the reason, RFC 6750 challenge, no echo."""
    for name, token, reason in refused_cases(minted):
        r = gw.get("/api/users/echo/x", headers=bearer(token))
        body = assert_refused(r, reason, token if len(token) > 40 else None)
        www = r.header("www-authenticate")
        assert www.startswith('Bearer realm="tollgate", error="invalid_token", error_description="'), (name, www)
        assert body["detail"], name
        assert gw.stat(f"tollgate.auth.denied.{reason}") >= 1, (name, reason)
    # HS256 with the right secret and typ passes (the inline-key provider).
    ok = hs256({"alg": "HS256", "typ": "at+jwt", "kid": "hs1"}, demo_claims(iss="https://hs.local"), HS_SECRET)
    assert gw.get("/api/users/echo/x", headers=bearer(ok)).status == 200
    assert "panicked" not in gw.log()


def test_missing_token(gw):
    r = gw.get("/api/users/1")
    assert_refused(r, "missing")
    assert r.header_all("www-authenticate") == ['Bearer realm="tollgate"', 'ApiKey realm="tollgate"']
    # Public route: no credential needed.
    assert gw.get("/api/products/1").status == 200


def test_unknown_kid_refetches_and_key_rotation(gw, idp, minted):
    next_keys = KEYS / "rotation.jwks.json"
    token = minted(kid="demo-es256-next", keys=next_keys, iss="https://rotating.local")
    before = idp.count("/rot-jwks")
    r = gw.get("/api/users/echo/x", headers=bearer(token))
    assert_refused(r, "unknown_kid", token)
    assert idp.count("/rot-jwks") > before, "an unknown kid refetches the JWKS"
    # The provider rotates: the new key is published. After the refetch interval (1 s) the
    # unknown kid causes one more fetch, which finds it.
    idp.set("/rot-jwks", public_jwks("demo-es256", "demo-es256-next", files=("jwks.json", "rotation.jwks.json")))
    # Until the interval has passed the token is refused (no refetch); the signal is its answer.
    harness.wait_for(lambda: gw.get("/api/users/echo/x", headers=bearer(token)).status == 200, 60,
                     "the rotated key to be fetched")
    # Refetches are rate-limited (one per refetch_interval for the whole Envoy): a burst of
    # unknown kids does not fetch per request. Provider `burst` has an interval of an hour, so
    # however slowly the burst runs, one refetch is all it may cause.
    harness.wait_for(lambda: idp.count("/burst-jwks") >= 1, 60, "the burst provider's first fetch")
    harness.wait_for(lambda: gw.get("/api/users/echo/x", headers=bearer(minted(iss="https://burst.local"))).status
                     == 200, 60, "the burst provider's keys")
    stranger = minted(kid="demo-es256-next", keys=next_keys, iss="https://burst.local", header={"kid": "nobody"})
    count = idp.count("/burst-jwks")
    for _ in range(10):
        assert_refused(gw.get("/api/users/echo/x", headers=bearer(stranger)), "unknown_kid")
    assert idp.count("/burst-jwks") - count == 1, "refetches must be rate-limited"


def test_oidc_discovery_gives_the_jwks(gw, idp, minted):
    token = minted(kid="demo-rs256", iss="https://oidc.local", sub="alice")
    h = echo_headers(gw.get("/api/users/echo/x", headers=bearer(token)))
    assert h["x-tollgate-consumer"] == "alice"
    assert idp.count("/.well-known/openid-configuration") >= 1 and idp.count("/oidc-jwks") >= 1


def test_token_sources_header_prefix_query_cookie(gw, minted):
    token = minted(sub="carol")
    h = echo_headers(gw.get("/api/users/echo/s", headers={"x-token": f"Token {token}"}))
    assert h["x-tollgate-consumer"] == "carol" and "x-token" not in h
    r = gw.get(f"/api/users/echo/s?a=1&access_token={token}")
    assert echo_headers(r)["x-tollgate-consumer"] == "carol"
    assert "access_token" not in r.json()["path"] and "a=1" in r.json()["path"]
    h = echo_headers(gw.get("/api/users/echo/s", headers={"cookie": f"theme=dark; session={token}"}))
    assert h["x-tollgate-consumer"] == "carol"
    assert h["cookie"] == "theme=dark", "remove_credential removes only the session cookie"
    # A header without the configured prefix is not a token source.
    assert_refused(gw.get("/api/users/echo/s", headers={"x-token": token}), "missing")


def test_keys_are_refreshed_before_they_expire(gw, idp, minted):
    """cache_duration 2s: every VM refetches at 80 % of it, without any request asking."""
    token = minted(iss="https://short.local")
    assert gw.get("/api/users/echo/x", headers=bearer(token)).status == 200
    before = idp.count("/short-jwks")
    harness.wait_for(lambda: idp.count("/short-jwks") - before >= 2, 60, "two refreshes of the short-lived keys")
    assert gw.get("/api/users/echo/x", headers=bearer(token)).status == 200


def test_verified_token_cache(gw, minted):
    token = minted(sub="cached")
    hits = gw.stat("tollgate.auth.allowed.jwt_cached")
    for _ in range(6):
        assert gw.get("/api/users/echo/x", headers=bearer(token)).status == 200
    # Two workers: at most two signature checks, the rest from the cache.
    assert gw.stat("tollgate.auth.allowed.jwt_cached") - hits >= 4


# ---------------------------------------------------------------------------------------------
# API keys, authorization, requirements, introspection


def test_api_keys(gw):
    h = echo_headers(gw.get("/api/users/echo/k", headers={"x-api-key": "demo-key-pro", "x-tollgate-plan": "free"}))
    assert h["x-tollgate-consumer"] == "acme"
    assert h["x-tollgate-plan"] == "pro"
    assert h["x-tollgate-region"] == "eu"
    assert "x-api-key" not in h
    r = gw.get("/api/users/echo/k?a=1&api_key=demo-key-pro")
    assert echo_headers(r)["x-tollgate-consumer"] == "acme"
    assert "api_key" not in r.json()["path"], "remove_credential strips the query parameter"
    r = gw.get("/api/users/echo/k", headers={"x-api-key": "demo-key-wrong"})
    assert_refused(r, "invalid_api_key", "demo-key-wrong")
    assert r.header("www-authenticate").startswith('ApiKey realm="tollgate", error="invalid_key"')
    assert_refused(gw.get("/api/users/echo/k", headers={"x-api-key": "demo-key-expired"}), "expired_api_key")
    assert gw.stat("tollgate.auth.allowed.api_key") >= 2


def test_scopes_claims_and_consumers(gw, minted):
    assert gw.get("/api/orders/echo/1", headers=bearer(minted(scopes="orders:read profile"))).status == 200
    assert gw.get("/api/orders/echo/1", headers=bearer(minted(claims={"scp": ["orders:read"]}))).status == 200
    r = gw.get("/api/orders/echo/1", headers=bearer(minted(scopes="users:read")))
    assert_refused(r, "insufficient_scope", status=403)
    assert 'error="insufficient_scope"' in r.header("www-authenticate")
    assert 'scope="orders:read"' in r.header("www-authenticate")
    assert gw.get("/api/users/echo/admin", headers=bearer(minted(claims={"roles": ["admin"]}))).status == 200
    assert_refused(gw.get("/api/users/echo/admin", headers=bearer(minted(claims={"roles": ["dev"]}))),
                   "claim_mismatch", status=403)
    assert gw.get("/api/users/echo/acme-only", headers={"x-api-key": "demo-key-pro"}).status == 200
    assert_refused(gw.get("/api/users/echo/acme-only", headers=bearer(minted())), "consumer_not_allowed", status=403)


def test_optional_and_allow_missing_routes(gw, minted):
    expired = minted(ttl=-300)
    h = echo_headers(gw.get("/api/users/echo/opt", headers=bearer(expired)))
    assert "x-tollgate-consumer" not in h
    assert echo_headers(gw.get("/api/users/echo/opt", headers=bearer(minted())))["x-tollgate-consumer"] == "alice"
    assert gw.get("/api/users/echo/maybe").status == 200
    assert_refused(gw.get("/api/users/echo/maybe", headers=bearer(expired)), "expired")


def test_introspection_active_inactive_and_cached(gw, idp, services):
    h = echo_headers(gw.get("/api/users/echo/i", headers=bearer("active-bob")))
    assert h["x-tollgate-consumer"] == "bob" and h["x-tollgate-plan"] == "pro"
    calls = idp.count("/introspect")
    for _ in range(4):
        assert gw.get("/api/orders/echo/1", headers=bearer("active-bob")).status == 200
    assert idp.count("/introspect") == calls, "active results are cached in shared data (all workers)"
    assert_refused(gw.get("/api/users/echo/i", headers=bearer("revoked-token")), "inactive_token", "revoked-token")
    calls = idp.count("/introspect")
    assert_refused(gw.get("/api/users/echo/i", headers=bearer("revoked-token")), "inactive_token")
    assert idp.count("/introspect") == calls, "inactive results are cached briefly"
    assert gw.stat("tollgate.auth.introspection_cache_hits") >= 5
    # A request body arriving while the answer is awaited does not take the request upstream:
    # the introspection answer is held until Envoy has received the whole body.
    idp.introspect_hold = True
    idp.hold_again()
    try:
        for token, want in [("revoked-with-body", 401), ("active-withbody", 200)]:
            services.reset_stats()
            received = gw.stat("http.gateway.downstream_cx_rx_bytes_total")
            result = []
            t = threading.Thread(target=lambda tk=token: result.append(
                gw.request("POST", "/api/users/echo/body", headers=bearer(tk), body="x" * 5000)))
            t.start()
            harness.wait_for(lambda: idp.held("/introspect") >= 1, 60, "the introspection call")
            harness.wait_for(lambda: gw.stat("http.gateway.downstream_cx_rx_bytes_total") - received >= 5000, 60,
                             "the request body at Envoy")
            idp.release()
            t.join(60)
            idp.hold_again()
            [r] = result
            assert r.status == want, (token, r)
            assert services.hits("users", "/users/echo/body") == (1 if want == 200 else 0), token
        # Endpoint that does not answer: the failure mode once the timeout (1 s) has passed, not
        # before it.
        r = gw.get("/api/users/echo/i", headers=bearer("active-slowpoke"), timeout=60)
        assert_refused(r, "unavailable", "active-slowpoke", status=503)
        assert r.elapsed >= 0.9, r.elapsed
    finally:
        idp.introspect_hold = False
        idp.release()


# ---------------------------------------------------------------------------------------------
# Key server and introspection endpoint down, slow, returning garbage


def test_key_server_down_slow_garbage_and_introspection_down(services, idp, minted, envoy_factory):
    closed = free_port()  # nothing listens there
    auth = {
        "providers": [
            {"name": "down", "issuer": "https://down.local",
             "remote_jwks": {"cluster": "closed", "path": "/jwks", "timeout": "1s"}},
            {"name": "slow", "issuer": "https://slow.local",
             "remote_jwks": {"cluster": "idp", "path": "/slow-jwks", "timeout": "500ms"}},
            {"name": "garbage", "issuer": "https://garbage.local",
             "remote_jwks": {"cluster": "idp", "path": "/garbage-jwks", "timeout": "1s"}},
        ],
        "introspection": {"cluster": "closed", "path": "/introspect", "timeout": "1s"},
        "routes": [{"match": {"prefix": "/api"}}],
    }
    idp.hold_again()  # /slow-jwks does not answer (its timeout is 500 ms) until the end of the test
    try:
        key_servers_down(services, idp, minted, envoy_factory, auth, closed)
    finally:
        idp.release()


def key_servers_down(services, idp, minted, envoy_factory, auth, closed):
    envoy = envoy_factory(config=envoy_config(services, idp, auth, extra_clusters=[static_cluster("closed", closed)]),
                          concurrency=2)
    for iss in ("https://down.local", "https://slow.local", "https://garbage.local"):
        r = envoy.get("/api/users/echo/x", headers=bearer(minted(iss=iss)), timeout=15)
        body = assert_refused(r, "unavailable", status=503)
        assert "could not be fetched" in body["detail"] or "timed out" in body["detail"], body
        assert r.header("www-authenticate") is None
    r = envoy.get("/api/users/echo/x", headers=bearer("opaque-token"), timeout=15)
    assert_refused(r, "unavailable", "opaque-token", status=503)
    assert envoy.stat("tollgate.auth.jwks_fetch_failures") >= 3
    assert envoy.stat("tollgate.auth.introspection_failures") >= 1
    # A failing key server is retried once per retry_interval (1 s) for the whole Envoy, not on
    # every tick of every worker: over any span of the test's own time, at most one fetch per
    # interval begun (the bound grows with the span, so a slow machine cannot break it).
    t0, start = time.monotonic(), idp.count("/garbage-jwks")
    harness.wait_for(lambda: idp.count("/garbage-jwks") - start >= 1, 60, "a retry of the garbage key server")
    fetched, span = idp.count("/garbage-jwks") - start, time.monotonic() - t0
    assert fetched <= span / 1.0 + 2, (fetched, span)
    log = envoy.log()
    assert "key fetch failed" in log
    assert "panicked" not in log
    # failure_mode allow: the same outage lets requests through, without identity.
    auth["failure_mode"] = "allow"
    envoy = envoy_factory(config=envoy_config(services, idp, auth, extra_clusters=[static_cluster("closed", closed)]))
    h = echo_headers(envoy.get("/api/users/echo/x", headers=bearer(minted(iss="https://down.local")), timeout=15))
    assert "x-tollgate-consumer" not in h
    assert envoy.stat("tollgate.auth.failure_mode_allowed") == 1
    # A token refused for its own sake is still refused.
    assert_refused(envoy.get("/api/users/echo/x", headers=bearer(minted(iss="https://nobody.local"))),
                   "unknown_issuer")


def test_make_token_prints_a_demo_token():
    """`make token` runs the mint-token that `make build` built: no cargo inside the tests."""
    import subprocess
    plan = subprocess.run(["make", "-n", "-s", "token", "SUB=dora"], cwd=harness.ROOT, capture_output=True,
                          text=True, timeout=60, check=True, env=harness.user_env()).stdout
    assert "cargo" not in plan and "target/release/examples/mint-token" in plan, plan
    out = subprocess.run(["make", "-s", "token", "SUB=dora", "SCOPES=orders:read orders:write"], cwd=harness.ROOT,
                         capture_output=True, text=True, timeout=60, check=True, env=harness.user_env()).stdout.strip()
    header, payload, sig = out.split(".")
    assert json.loads(unb64(header))["kid"] == "demo-es256"
    claims = json.loads(unb64(payload))
    assert claims["sub"] == "dora" and claims["scope"] == "orders:read orders:write"
    assert claims["iss"] == ISSUER and claims["exp"] > time.time()


def test_requests_during_the_first_fetch_wait_for_it(services, idp, minted, envoy_factory):
    """Requests that arrive while the VM-start fetch is under way are paused and woken when it
    ends; one fetch per VM, not one per request. The requests go to Envoy's direct 404 route
    (after the filter), so the answer only depends on the filter: 404 = authenticated."""
    auth = {
        "providers": [{"name": "lazy", "issuer": "https://lazy.local",
                       "remote_jwks": {"cluster": "idp", "path": "/lazy-jwks", "timeout": "60s"}}],
        "routes": [{"match": {"prefix": "/"}}],
    }
    token = minted(iss="https://lazy.local")
    before = idp.count("/lazy-jwks")
    idp.hold_again()  # the fetch answers when the test says so
    try:
        envoy = envoy_factory(config=envoy_config(services, idp, auth), concurrency=2)
        harness.wait_for(lambda: idp.held("/lazy-jwks") >= 1, 60, "the VM-start key fetch")
        results = []

        def one():
            results.append(envoy.get("/waiting", headers=bearer(token), timeout=60))

        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        # The eight requests are inside Envoy, and none has an answer while the fetch is held.
        harness.wait_for(lambda: envoy.stat("http.gateway.downstream_rq_active") >= 8, 60, "eight active requests")
        assert results == [], "the requests should wait for the fetch"
    finally:
        idp.release()
    for t in threads:
        t.join(60)
    assert len(results) == 8
    assert [r.status for r in results] == [404] * 8, results
    # One fetch for the whole Envoy (a lease in shared data), not one per request or per worker.
    assert idp.count("/lazy-jwks") - before == 1
    assert envoy.stat("tollgate.auth.allowed.jwt") + envoy.stat("tollgate.auth.allowed.jwt_cached") == 8


# ---------------------------------------------------------------------------------------------
# Configuration, schema and the bundled demo


def test_bad_configurations_are_refused_naming_the_field(services, envoy_factory):
    for config, field in [
        ({"api_keys": {"keys": [{"key": "plain-text", "consumer": "x"}]}}, "api_keys.keys[0].key"),
        ({"providers": [{"name": "a", "issuer": "i", "algorithms": ["none"], "jwks": {"keys": []}}]},
         "providers[0].algorithms[0]"),
    ]:
        envoy = envoy_factory(filters=[("auth", config)], services=services, expect_failure=True)
        lines = harness.config_error_lines(envoy, "auth")
        assert len(lines) == 1 and f"field `{harness.config_field('auth', field)}`" in lines[0], envoy.log_tail()
        assert "plain-text" not in lines[0] or field.endswith(".key")


def test_schema_accepts_documented_and_bundled_configs_and_refuses_bad_ones():
    from harness import bundled_filter_configs, schema_validator

    v = schema_validator("auth")
    assert not list(v.iter_errors(bundled_filter_configs()["auth"]))
    assert not list(v.iter_errors(main_auth_config()))
    doc = (harness.ROOT / "docs" / "filters" / "auth.md").read_text()
    example = doc.split("<!-- example -->")[1].split("```json")[1].split("```")[0]
    assert not list(v.iter_errors(json.loads(example)))
    for bad in [
        {"api_keys": {"keys": [{"key": "plain", "consumer": "c"}]}},
        {"api_keys": {"keys": [{"sha256": "abc", "consumer": "c"}]}},
        {"providers": [{"name": "a", "issuer": "i", "algorithms": ["none"], "jwks": {"keys": []}}]},
        {"providers": [{"name": "a", "issuer": "i"}]},
        {"routes": [{"requirement": "sometimes"}]},
        {"failure_mode": "maybe"},
    ]:
        assert not v.is_valid(bad), bad


def test_bundled_demo_protects_users_and_orders(services, minted, envoy_factory):
    from harness import bundled_config

    envoy = envoy_factory(config=bundled_config(services))
    assert envoy.get("/api/products/1").status == 200
    assert_refused(envoy.get("/api/users/1"), "missing")
    token = minted(sub="alice", scopes="orders:read")
    harness.wait_for(lambda: envoy.stat("tollgate.auth.jwks_fetches") >= 1, 60, "the demo provider's keys")
    r = envoy.get("/api/orders/1", headers=bearer(token))
    assert r.status == 200, r
    assert envoy.get("/api/users/1", headers={"x-api-key": "demo-key-pro"}).status == 200
    assert envoy.get("/api/orders/1", headers={"x-api-key": "demo-key-free"}).status == 200
    assert_refused(envoy.get("/api/users/1", headers={"x-api-key": "nope"}), "invalid_api_key")
    # Writing orders needs a JWT with orders:write.
    assert_refused(envoy.request("POST", "/api/orders", headers=bearer(token), body="{}"), "insufficient_scope",
                   status=403)
    r = envoy.request("POST", "/api/orders", headers=bearer(minted(scopes="orders:write")), body="{}")
    assert r.status == 201, r
    # The dashboard needs a credential (its calls read users and orders).
    assert_refused(envoy.get("/api/dashboard/1"), "missing")
    assert envoy.get("/api/dashboard", headers=bearer(token)).status == 200
    # The README's refusal.
    r = envoy.get("/api/orders/1", headers=bearer("not.a.token"))
    assert_refused(r, "malformed")
    assert r.header("www-authenticate").startswith('Bearer realm="tollgate", error="invalid_token"')


def test_benchmark_scenario_configs_accept_the_benchmark_credentials(services, envoy_factory):
    """bench/scenarios/auth: our configurations accept the scenario's tokens and API key (the
    request then reaches the harness's 404 route), and refuse a wrong one."""
    folder = harness.ROOT / "bench" / "scenarios" / "auth"
    scenarios = json.loads((folder / "scenarios.json").read_text())["scenarios"]
    for config in ("tollgate-cold.json", "tollgate-cached.json"):
        envoy = envoy_factory(filters=[("auth", json.loads((folder / config).read_text()))], services=services)
        for sc in scenarios:
            r = envoy.get(sc["request"]["path"], headers=sc["request"]["headers"])
            assert r.status == 404, (config, sc["id"], r)
        assert_refused(envoy.get("/bench/auth", headers={"x-api-key": "wrong"}), "invalid_api_key")
        envoy.stop()
    # Envoy's native filters of the scenario do the same check: the tokens and key pass, others not.
    jwt_sc = [sc for sc in scenarios if sc["id"].startswith("auth-jwt")]
    for native, requests in [("native-jwt-cold.json", jwt_sc), ("native-jwt-cached.json", jwt_sc),
                             ("native-api-key.json", [sc for sc in scenarios if sc["id"] == "auth-apikey"])]:
        envoy = envoy_factory(http_filters=json.loads((folder / native).read_text()), services=services)
        for sc in requests:
            assert envoy.get(sc["request"]["path"], headers=sc["request"]["headers"]).status == 404, (native, sc["id"])
        wrong = {"authorization": "Bearer " + hs256({"alg": "HS256"}, {}, HS_SECRET), "x-api-key": "wrong"}
        assert envoy.get("/bench/auth", headers=wrong).status == 401, native
        envoy.stop()
