#!/usr/bin/env python3
"""Writes the auth benchmark scenario (scenarios.yaml and the Tollgate configurations) from the
benchmark's own keys and tokens in ../extra (bench-keys.jwks.json, tokens.json; made by
../extra/make_keys.py). Run again after those change:

    python3 bench/scenarios/auth/make_scenarios.py
"""
import hashlib
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXTRA = HERE.parent / "extra"
tokens = json.loads((EXTRA / "tokens.json").read_text())
jwks = json.loads((EXTRA / "bench-keys.jwks.json").read_text())
public = {"keys": [{k: v for k, v in key.items() if k not in ("d", "p", "q", "dp", "dq", "qi")} for key in jwks["keys"]]}


def tollgate(cache: int) -> dict:
    return {
        "providers": [{"name": "bench", "issuer": tokens["issuer"], "audiences": [tokens["audience"]],
                       "algorithms": ["ES256", "RS256"], "jwks": public}],
        "api_keys": {"keys": [{"sha256": hashlib.sha256(tokens["api_key"].encode()).hexdigest(),
                               "consumer": "bench"}]},
        "token_cache_size": cache,
        "routes": [{"match": {"prefix": "/bench/auth"}}],
    }


(HERE / "tollgate-cold.json").write_text(json.dumps(tollgate(0), indent=1) + "\n")
(HERE / "tollgate-cached.json").write_text(json.dumps(tollgate(1024), indent=1) + "\n")


def native_jwt(cache: bool) -> list:
    provider = {"issuer": tokens["issuer"], "audiences": [tokens["audience"]],
                "local_jwks": {"inline_string": json.dumps(public)}, "forward": True}
    if cache:
        provider["jwt_cache_config"] = {"jwt_cache_size": 1024}
    return [{"name": "envoy.filters.http.jwt_authn", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
        "providers": {"bench": provider},
        "rules": [{"match": {"prefix": "/bench/auth"}, "requires": {"provider_name": "bench"}}]}}]


native_key = [{"name": "envoy.filters.http.api_key_auth", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.http.api_key_auth.v3.ApiKeyAuth",
    "credentials": [{"key": tokens["api_key"], "client": "bench"}],
    "key_sources": [{"header": "x-api-key"}]}}]
(HERE / "native-jwt-cold.json").write_text(json.dumps(native_jwt(False), indent=1) + "\n")
(HERE / "native-jwt-cached.json").write_text(json.dumps(native_jwt(True), indent=1) + "\n")
(HERE / "native-api-key.json").write_text(json.dumps(native_key, indent=1) + "\n")


# The wasm floor measured inside the scenario (bench.py's "Over the wasm floor" table): issue #11
# asks for the token-cache and API-key paths at most 10 µs over it.
FLOOR = {"name": "probe (wasm floor)", "kind": "floor", "modules": ["probe"],
         "filters": [{"module": "probe", "config": {}}]}


def jwt_scenario(alg: str) -> dict:
    return {
        "id": f"auth-jwt-{alg.lower()}",
        "title": f"Auth: JWT {alg} (the same valid token on every request)",
        "modules": ["auth"],
        "request": {"path": "/bench/auth", "headers": {"authorization": "Bearer " + tokens[alg]}},
        "variants": [
            {"name": "native jwt_authn", "kind": "native", "http_filters_file": "native-jwt-cold.json"},
            {"name": "native jwt_authn (jwt_cache on)", "kind": "native-cached",
             "http_filters_file": "native-jwt-cached.json"},
            {"name": "tollgate (token cache off)", "kind": "tollgate", "compare_to": "native jwt_authn",
             "filters": [{"module": "auth", "config_file": "tollgate-cold.json"}]},
            {"name": "tollgate (token cache on)", "kind": "tollgate",
             "compare_to": "native jwt_authn (jwt_cache on)",
             "filters": [{"module": "auth", "config_file": "tollgate-cached.json"}]},
            FLOOR,
        ],
    }


def forged_scenario(alg: str, sig_bytes: int) -> dict:
    """A flood of forged tokens: the valid header and claims of `alg`'s token with a random
    signature of the right length, new on every request (`{rand:K}`, bench/loadgen), so that
    no cache can answer and every request costs a full verification that fails. The scenario's
    own request is the valid token (what tests/test_auth.py checks every scenario with); both
    variants override it with the forged one."""
    signed_part = tokens[alg].rsplit(".", 1)[0]
    forged = {"request": {"path": "/bench/auth",
                          "headers": {"authorization": f"Bearer {signed_part}.{{rand:{sig_bytes}}}"}},
              "expect_status": [401]}
    return {
        "id": f"auth-jwt-{alg.lower()}-forged",
        "title": f"Auth: JWT {alg}, a flood of forged signatures (valid header and claims, a new random signature each request)",
        "modules": ["auth"],
        "request": {"path": "/bench/auth", "headers": {"authorization": "Bearer " + tokens[alg]}},
        "variants": [
            {"name": "native jwt_authn", "kind": "native", "http_filters_file": "native-jwt-cold.json", **forged},
            {"name": "tollgate (token cache off)", "kind": "tollgate", "compare_to": "native jwt_authn",
             "filters": [{"module": "auth", "config_file": "tollgate-cold.json"}], **forged},
        ],
    }


scenarios = {"scenarios": [
    jwt_scenario("ES256"),
    jwt_scenario("RS256"),
    forged_scenario("ES256", 64),
    forged_scenario("RS256", 256),
    {
        "id": "auth-apikey",
        "title": "Auth: API key in a header",
        "modules": ["auth"],
        "request": {"path": "/bench/auth", "headers": {"x-api-key": tokens["api_key"]}},
        "variants": [
            {"name": "native api_key_auth", "kind": "native", "http_filters_file": "native-api-key.json"},
            {"name": "tollgate", "kind": "tollgate", "filters": [{"module": "auth", "config_file": "tollgate-cold.json"}]},
            FLOOR,
        ],
    },
]}
(HERE / "scenarios.json").write_text(json.dumps(scenarios, indent=1) + "\n")
print("wrote", ", ".join(sorted(p.name for p in HERE.glob("*.json"))))
