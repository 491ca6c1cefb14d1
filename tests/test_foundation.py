"""Foundation: the bundled demo configuration, each filter's VM start and configuration checks."""

import json
import re
import subprocess

import pytest

import harness
from harness import ROOT, Envoy, bundled_config, bundled_filter_configs, free_port, schema_validator


def test_bundled_config_validates():
    r = subprocess.run([harness.envoy_binary(), "--mode", "validate", "-c", "envoy/envoy.yaml"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "OK" in r.stdout + r.stderr


def test_smoke_through_all_four_filters(services, envoy_factory):
    envoy = envoy_factory(config=bundled_config(services))
    r = envoy.get("/api/products/1")
    assert r.status == 200, r
    assert r.json()["id"] == 1
    assert r.header("x-demo-service") == "products"
    # The request went through every filter: each counted it.
    for name in harness.FILTERS:
        assert envoy.handled(name) >= 1, (name, envoy.stats("tollgate"))
    log = envoy.log()
    modules = ["tollgate"] if harness.COMBINED else [f"tollgate-{n}" for n in harness.FILTERS]
    for name in modules:
        assert re.search(rf"{name} \d+\.\d+\.\d+: VM started", log), name
    # Unknown paths get the bundled 404, still through the chain.
    assert envoy.get("/nope").status == 404


@pytest.mark.parametrize("name", harness.FILTERS)
def test_bad_configuration_is_refused_naming_the_field(name, services, envoy_factory):
    envoy = envoy_factory(filters=[(name, {"routes": [], "no_such_field": 1})], services=services,
                          expect_failure=True)
    assert envoy.returncode not in (None, 0)
    lines = harness.config_error_lines(envoy, name)
    assert len(lines) == 1, envoy.log_tail()
    field = harness.config_field(name, "no_such_field")
    assert f"field `{field}`" in lines[0] and "unknown field" in lines[0], lines[0]


@pytest.mark.parametrize("config, field", [
    ("{not json", "(root)"),
    ('{"routes": [{"match": {"template": "/a/{*x}/b"}}]}', "routes[0].match"),
])
def test_malformed_configurations_are_refused(config, field, services, envoy_factory):
    envoy = envoy_factory(filters=[("ratelimit", config)], services=services, expect_failure=True)
    lines = harness.config_error_lines(envoy, "ratelimit")
    assert len(lines) == 1 and f"field `{harness.config_field('ratelimit', field)}`" in lines[0], envoy.log_tail()


def test_non_utf8_header_does_not_crash_the_vm(services, envoy_factory):
    envoy = envoy_factory(filters=[(n, {}) for n in harness.FILTERS], services=services)
    # Upstream servers may refuse such a header themselves, so use Envoy's direct 404 route:
    # the request still passes all four filters, which read every header.
    r = envoy.get("/nope", headers=[("x-latin1", "caf\xe9")])
    assert r.status == 404, r
    assert envoy.get("/api/products/3").status == 200
    for name in harness.FILTERS:
        assert envoy.handled(name) == 2, name
    assert "panicked" not in envoy.log()


def test_bundled_filter_order_and_schemas():
    configs = bundled_filter_configs()
    assert list(configs) == list(harness.FILTERS), "chain must be auth -> ratelimit -> cache -> aggregate"
    for name, config in configs.items():
        errors = list(schema_validator(name).iter_errors(config))
        assert not errors, (name, [e.message for e in errors])


@pytest.mark.parametrize("name", harness.FILTERS)
def test_schema_refuses_what_the_filter_refuses(name):
    v = schema_validator(name)
    assert not v.is_valid({"no_such_field": 1})
    assert not v.is_valid({"routes": [{"match": {"prefix": "/a", "exact": "/a"}}]})
    assert v.is_valid({"routes": [{"match": {"template": "/api/users/{id}", "methods": ["GET"]}}]})


def test_root_wakes_a_paused_request_which_calls_out_and_continues(services, envoy_factory):
    """The adapter's wake path on a real Envoy: the probe pauses each request, its root wakes it
    from on_tick, the woken request makes a callout (answered to it, not to the root) and then
    continues upstream with the callout's status in a header."""
    envoy = envoy_factory(filters=[("probe", {"wait_ms": 150, "call_cluster": "users"})],
                          services=services, concurrency=2)
    results = []

    def one():
        results.append(envoy.get("/api/users/echo/x"))

    import threading
    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert len(results) == 6
    for r in results:
        assert r.status == 200, r
        headers = r.json()["headers"]
        assert headers.get("x-probe-woken") == "1", headers
        assert headers.get("x-probe-call-status") == "200", headers
        assert r.elapsed >= 0.14, r.elapsed
    assert "panicked" not in envoy.log()


def test_probe_passes_traffic_with_empty_configuration(services, envoy_factory):
    envoy = envoy_factory(filters=[("probe", {})], services=services)
    r = envoy.get("/api/users/echo/y")
    assert r.status == 200 and "x-probe-woken" not in r.json()["headers"]


def test_a_header_map_read_out_of_phase_does_not_kill_the_vm(services, envoy_factory):
    """Envoy refuses to read request headers in a response hook (BadArgument); the SDK's own
    wrapper would panic and kill the VM. The adapter reports it as absent instead."""
    envoy = envoy_factory(filters=[("probe", {"read_request_in_response": True})], services=services)
    for _ in range(3):
        r = envoy.get("/api/products/1")
        assert r.status == 200, r
        assert r.header("x-probe-request-path") in ("unavailable", "/api/products/1"), r
    assert "panicked" not in envoy.log() and "unexpected status" not in envoy.log()


def test_a_panic_is_logged_at_critical_before_the_vm_dies(services, envoy_factory):
    """The panic hook: a panic (here the probe's, on purpose) is logged through the proxy at
    critical level, with its message and location, before the VM aborts; Envoy then refuses the
    request (fail closed) instead of letting it through."""
    envoy = envoy_factory(filters=[("probe", {"panic_on_request": True})], services=services)
    r = envoy.get("/api/products/1")
    assert r.status == 503, r
    line = "tollgate-probe: panicked at filters/probe/src/lib.rs:"
    harness.wait_for(lambda: line in envoy.log(), 60, "the panic's log line")
    [logged] = [l for l in envoy.log().splitlines() if line in l]
    assert "[critical]" in logged, logged
    assert "probe: a panic on purpose (panic_on_request)" in logged, logged
    # The VM is gone: later requests are refused too, never let through.
    assert envoy.get("/api/products/1").status == 503
