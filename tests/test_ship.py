"""Shipping: Docker Compose, Istio WasmPlugins, Envoy Gateway policies, plain-Envoy snippets, OCI
image layouts and release artifacts. No Docker engine or Kubernetes runs here, so these tests
check the files against what they refer to, the published schemas, and a real Envoy in
`--mode validate`."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import jsonschema
import pytest
import yaml

import harness
from harness import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import oci  # noqa: E402

FILTERS = harness.FILTERS
VERSION = oci.workspace_version()
ISTIO_PHASES = ["AUTHN", "AUTHZ", "STATS", "UNSPECIFIED_PHASE"]


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def validate_envoy(config_path: Path, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([harness.envoy_binary(), "--mode", "validate", "-c", str(config_path), "-l", "warn"],
                          cwd=cwd, capture_output=True, text=True, timeout=120)


def deploy_validator(name: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((ROOT / "deploy" / "schemas" / f"{name}.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def errors(validator, doc) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def gen_deploy():
    """scripts/gen-deploy.py as a module."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("gen_deploy", ROOT / "scripts" / "gen-deploy.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    return gen


def yaml_blocks(path: Path) -> list[str]:
    """The ```yaml blocks of a Markdown file."""
    return re.findall(r"```yaml\n(.*?)```", path.read_text(), re.S)


def bundled_envoy() -> dict:
    return load_yaml(ROOT / "envoy" / "envoy.yaml")


def bundled_ports() -> dict[str, int]:
    cfg = bundled_envoy()
    ports = {"listener": cfg["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"],
             "admin": cfg["admin"]["address"]["socket_address"]["port_value"]}
    for c in cfg["static_resources"]["clusters"]:
        ep = c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
        ports[c["name"]] = ep["port_value"]
    return ports


# ---------------------------------------------------------------------------------------------
# Docker Compose


def compose() -> dict:
    return load_yaml(ROOT / "docker-compose.yml")


def host_path(service: dict, container_path: str) -> Path | None:
    """The host path a container path of `service` comes from, through its bind mounts."""
    best = None
    for vol in service.get("volumes", []):
        src, dst = vol.split(":")[:2]
        if container_path == dst or container_path.startswith(dst.rstrip("/") + "/"):
            if best is None or len(dst) > len(best[1]):
                best = (src, dst)
    if best is None:
        return None
    rest = container_path[len(best[1]):].lstrip("/")
    return (ROOT / best[0]).resolve() / rest


def test_compose_files_exist_images_pinned_and_health_gated():
    c = compose()
    services = c["services"]
    # (Other services may join; these are the demo's, the rate limit service's and the dashboard's.)
    assert {"demo", "envoy", "redis", "rls", "prometheus", "grafana"} <= set(services)
    demo, envoy = services["demo"], services["envoy"]
    # Every file the compose file refers to exists (build/ after `make build`).
    assert (ROOT / demo["build"]["context"]).is_dir()
    dockerfile = ROOT / demo["build"]["context"] / demo["build"]["dockerfile"]
    assert dockerfile.is_file(), dockerfile
    for svc in services.values():
        for vol in svc.get("volumes", []):
            src, _dst, mode = vol.split(":")
            assert (ROOT / src).exists(), vol
            assert mode == "ro", f"mounts are read-only: {vol}"
    # Files named on the command lines (the configuration, the demo JWKS) come from the mounts.
    for name, svc in services.items():
        for arg in svc.get("command", []):
            if arg.startswith("/") and host_path(svc, arg) is not None:
                assert host_path(svc, arg).is_file(), f"{name}: {arg} is not in the repository"
    # Pinned images: an exact Envoy release, never `latest`, the one `make run` installs.
    assert re.fullmatch(r"envoyproxy/envoy:v\d+\.\d+\.\d+", envoy["image"]), envoy["image"]
    make_version = re.search(r"^ENVOY_VERSION\s*\?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert envoy["image"] == f"envoyproxy/envoy:v{make_version}"
    for line in dockerfile.read_text().splitlines():
        if line.startswith("FROM "):
            image = line.split()[1]
            assert image == "scratch" or re.search(r":\d", image), f"unpinned base image {image}"
    # Health checks and start order.
    for name, svc in services.items():
        assert svc["healthcheck"]["test"][0] == "CMD", name
    assert envoy["depends_on"]["demo"]["condition"] == "service_healthy"
    # The demo's health-check command is the one its Dockerfile installs.
    assert demo["healthcheck"]["test"][1] in dockerfile.read_text()
    assert "tollgate-demo" in dockerfile.read_text() and "-p tollgate-demo" in dockerfile.read_text()
    # The rate limit service: built from its Dockerfile, after Redis, before Envoy; pinned Redis.
    rls, redis = services["rls"], services["redis"]
    rls_dockerfile = ROOT / rls["build"]["context"] / rls["build"]["dockerfile"]
    assert "-p tollgate-rls" in rls_dockerfile.read_text()
    for line in rls_dockerfile.read_text().splitlines():
        if line.startswith("FROM "):
            assert re.search(r":\d", line.split()[1]), line
    assert re.fullmatch(r"redis:\d+\.\d+\.\d+\S*", redis["image"]), redis["image"]
    assert rls["depends_on"]["redis"]["condition"] == "service_healthy"
    assert envoy["depends_on"]["rls"]["condition"] == "service_healthy"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"target", "build", ".venv"} <= set(ignored)


def test_compose_ports_match_bundled_config_make_run_and_readme():
    c = compose()
    ports = bundled_ports()
    demo, envoy = c["services"]["demo"], c["services"]["envoy"]
    assert demo["network_mode"] == envoy["network_mode"] == "host"
    # The demo services listen where envoy/envoy.yaml's clusters point.
    listens = dict(a.split("=") for a in demo["command"][1::2] if "=" in a)
    for name in harness.SERVICES:
        assert listens[name] == f"127.0.0.1:{ports[name]}", (name, listens)
    # `make run` uses the same addresses (scripts/run-demo.sh) ...
    run_demo = (ROOT / "scripts" / "run-demo.sh").read_text()
    for name in harness.SERVICES:
        assert f"{name}=127.0.0.1:{ports[name]}" in run_demo
    assert "-c envoy/envoy.yaml" in run_demo
    # ... and README's curls hit the bundled listener or admin port.
    readme = (ROOT / "README.md").read_text()
    curl_ports = {int(p) for p in re.findall(r"curl[^\n]*?127\.0\.0\.1:(\d+)", readme)}
    assert curl_ports, "README has no curl examples"
    assert curl_ports <= {ports["listener"], ports["admin"]}, curl_ports
    assert ports["listener"] in curl_ports
    # The Envoy health check asks the bundled admin port.
    assert f"127.0.0.1/{ports['admin']}" in envoy["healthcheck"]["test"][-1]


def test_compose_mounted_envoy_configuration_validates():
    envoy = compose()["services"]["envoy"]
    cmd = envoy["command"]
    config = host_path(envoy, cmd[cmd.index("-c") + 1])
    workdir = host_path(envoy, envoy["working_dir"] + "/envoy")
    assert config is not None and config.is_file(), config
    assert workdir is not None and workdir.parent == ROOT
    # Relative paths in the configuration (the modules) resolve from the container's working
    # directory; each must be inside a mount.
    for module in re.findall(r"filename:\s*(\S+)", config.read_text()):
        container = module if module.startswith("/") else f"{envoy['working_dir']}/{module}"
        hp = host_path(envoy, container)
        assert hp is not None and hp.is_file(), f"{module} is not mounted (or not built)"
    r = validate_envoy(config, cwd=workdir.parent)
    assert r.returncode == 0 and "OK" in r.stdout + r.stderr, r.stdout[-2000:] + r.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# Istio


def wasm_plugins() -> dict[str, dict]:
    return {f: load_yaml(ROOT / "deploy" / "istio" / f"tollgate-{f}.yaml") for f in FILTERS}


@pytest.mark.parametrize("name", FILTERS)
def test_istio_wasmplugin_is_valid_and_its_plugin_config_fits_the_filter_schema(name):
    doc = wasm_plugins()[name]
    assert not errors(deploy_validator("wasmplugin"), doc)
    spec = doc["spec"]
    assert spec["url"] == f"oci://ghcr.io/tollgate-gw/tollgate-{name}:{VERSION}"
    assert re.fullmatch(r"[0-9a-f]{64}", spec["sha256"])
    assert spec["pluginName"] == f"tollgate_{name}"
    assert spec["failStrategy"] == ("FAIL_OPEN" if name == "cache" else "FAIL_CLOSE")
    assert spec["match"] and spec["selector"]["matchLabels"]
    assert spec["imagePullPolicy"] in ("IfNotPresent", "Always")
    problems = errors(harness.schema_validator(name), spec["pluginConfig"])
    assert not problems, problems


def test_istio_plugins_run_in_chain_order():
    plugins = wasm_plugins()
    assert plugins["auth"]["spec"]["phase"] == "AUTHN"
    assert plugins["ratelimit"]["spec"]["phase"] == "AUTHZ"
    # Istio's order: by phase, then by descending priority.
    order = sorted(FILTERS, key=lambda f: (ISTIO_PHASES.index(plugins[f]["spec"].get("phase", "UNSPECIFIED_PHASE")),
                                           -plugins[f]["spec"].get("priority", 0)))
    assert order == list(FILTERS)
    # Two plugins in one phase need different priorities, or Istio orders them by name.
    keys = [(p["spec"]["phase"], p["spec"]["priority"]) for p in plugins.values()]
    assert len(set(keys)) == len(keys)


@pytest.mark.parametrize("mutation, field", [
    (lambda s: s.update(phase="AUTHENTICATION"), "phase"),
    (lambda s: s.update(sha256="sha256:abc"), "sha256"),
    (lambda s: s.update(failStrategy="FAIL_SOMETIMES"), "failStrategy"),
    (lambda s: s.update(pluginConfg={}), "pluginConfg"),
    (lambda s: s.update(targetRefs=[{"kind": "Gateway", "name": "gw"}]), "selector and targetRefs"),
    (lambda s: s["match"].append({"ports": [{"number": 70000}]}), "ports"),
    (lambda s: s.pop("url"), "url"),
])
def test_wasmplugin_schema_refuses_what_istio_refuses(mutation, field):
    doc = wasm_plugins()["auth"]
    mutation(doc["spec"])
    assert errors(deploy_validator("wasmplugin"), doc), field


def test_istio_cluster_names_point_at_the_demo_services():
    text = "\n".join((ROOT / "deploy" / "istio" / f"tollgate-{f}.yaml").read_text() for f in FILTERS)
    found = re.findall(r"outbound\|(\d+)\|\|([\w.-]+)", text)
    # The bundled configurations call out (JWKS, aggregation, cache refresh): their clusters were renamed.
    assert found and not re.search(r"cluster: (users|orders|products)\s*$", text, re.M)
    for cluster in found:
        port, host = cluster
        service, namespace = host.split(".")[:2]
        assert service in harness.SERVICES and namespace == "tollgate-demo" and port == "80", cluster


def test_istio_plugins_attach_to_every_listener_of_the_gateway():
    """No `match.ports`: Istio matches ports against the gateway's listener ports, so a port list
    leaves every other listener (HTTPS on 8443, a Helm-installed gateway on 80) without the filter,
    FAIL_CLOSE or not. Without ports, every listener of the selected gateway gets it."""
    layout = gen_deploy().ISTIO_LAYOUTS["istioctl"]
    for name, doc in wasm_plugins().items():
        spec = doc["spec"]
        assert all("ports" not in m for m in spec.get("match", [])), name
        assert all(m.get("mode", "CLIENT") in ("CLIENT", "CLIENT_AND_SERVER") for m in spec.get("match", [])), name
        assert spec["selector"]["matchLabels"] == layout["labels"], name
        assert doc["metadata"]["namespace"] == layout["namespace"], name


def test_istio_helm_gateway_layout(tmp_path):
    """`--istio-gateway helm`: the WasmPlugins (and the demo's Istio Gateway) for a gateway installed
    with Istio's Helm `gateway` chart as release istio-ingress: namespace istio-ingress, pods
    labelled istio=ingress (the chart's `istio` label is the release name without `istio-`)."""
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen-deploy.py"), "--istio-gateway", "helm",
                        "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for name in FILTERS:
        doc = load_yaml(tmp_path / "deploy" / "istio" / f"tollgate-{name}.yaml")
        assert not errors(deploy_validator("wasmplugin"), doc)
        assert doc["metadata"]["namespace"] == "istio-ingress"
        assert doc["spec"]["selector"]["matchLabels"] == {"istio": "ingress"}
        assert all("ports" not in m for m in doc["spec"]["match"])
        # Everything else is the default layout's.
        default = wasm_plugins()[name]
        for key in ("url", "sha256", "pluginConfig", "phase", "priority", "failStrategy", "match"):
            assert doc["spec"][key] == default["spec"][key], key
    gateway = next(d for d in yaml.safe_load_all((tmp_path / "deploy" / "kubernetes" / "demo-istio.yaml").read_text())
                   if d and d["kind"] == "Gateway")
    assert gateway["spec"]["selector"] == {"istio": "ingress"}
    shipped = next(d for d in yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / "demo-istio.yaml").read_text())
                   if d and d["kind"] == "Gateway")
    assert shipped["spec"]["selector"] == {"istio": "ingressgateway"}


def test_istio_docs_cover_both_layouts_and_make_ports_an_opt_in_with_its_warning():
    docs = (ROOT / "docs" / "deploy.md").read_text()
    istio = docs[docs.index("## Istio"):docs.index("## Envoy Gateway")]
    for layout in gen_deploy().ISTIO_LAYOUTS.values():
        (key, value), = layout["labels"].items()
        row = next((line for line in istio.splitlines() if line.startswith("|") and f"`{key}: {value}`" in line), None)
        assert row and f"`{layout['namespace']}`" in row and f"`{layout['workload']}`" in row, layout
    assert "--istio-gateway helm" in istio
    # The opt-in: a match with ports, shown as YAML that fits a WasmPlugin, next to the warning.
    snippet = next(b for b in yaml_blocks(ROOT / "docs" / "deploy.md") if "ports:" in b and "match:" in b)
    doc = wasm_plugins()["auth"]
    doc["spec"].update(yaml.safe_load(snippet))
    assert not errors(deploy_validator("wasmplugin"), doc)
    assert doc["spec"]["match"][0]["ports"]
    assert "**Warning.**" in istio and "FAIL_CLOSE` does not help" in istio
    assert "no Tollgate filter at all" in istio


def mesh_sidecars_config(services) -> tuple[dict, dict[str, int]]:
    """One Envoy listener in front of each demo service, as the service's sidecar: any valid Host
    is routed to the service; a Host that is not a valid host name (an Istio or Envoy Gateway
    cluster name) gets 400, as from Istio's sidecars."""
    cfg = harness.bootstrap(harness.free_port(), harness.free_port(), [],
                            [harness.static_cluster(n, p) for n, p in services.ports.items()])
    template = cfg["static_resources"]["listeners"][0]
    listeners, ports = [], {}
    for svc in harness.SERVICES:
        ports[svc] = harness.free_port()
        listener = json.loads(json.dumps(template))
        listener["name"] = f"sidecar-{svc}"
        listener["address"]["socket_address"]["port_value"] = ports[svc]
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["stat_prefix"] = f"sidecar_{svc}"
        hcm["route_config"]["virtual_hosts"] = [{"name": svc, "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "route": {"cluster": svc}}]}]
        listeners.append(listener)
    cfg["static_resources"]["listeners"] = listeners
    return cfg, ports


def generated_filter_configs(platform: str) -> dict[str, dict]:
    if platform == "istio":
        return {f: d["spec"]["pluginConfig"] for f, d in wasm_plugins().items()}
    doc = load_yaml(ROOT / "deploy" / "envoy-gateway" / "tollgate-all.yaml")
    return {w["rootID"].removeprefix("tollgate_"): w["config"] for w in doc["spec"]["wasm"]}


@pytest.mark.parametrize("platform", ["istio", "envoy-gateway"])
def test_generated_callouts_reach_the_services_under_the_platforms_cluster_names(platform, services, envoy_factory):
    """The Istio and Envoy Gateway configurations, run by a real Envoy whose clusters carry the
    platform's names (outbound|80||users.tollgate-demo.svc.cluster.local,
    httproute/default/tollgate-demo/rule/0, ...), with an Envoy in front of the services: the JWKS
    fetch succeeds and the aggregate answer is complete. With the cluster name as :authority (the
    filters' default), that Envoy answers 400."""
    gen = gen_deploy()
    mesh_cfg, sidecar = mesh_sidecars_config(services)
    mesh = envoy_factory(config=mesh_cfg)
    configs = generated_filter_configs(platform)
    # The clusters the configurations call: none is a demo cluster name; as a Host, each is refused.
    names = {c for cfg in configs.values() for c in gen.referenced_clusters(cfg, _AnyName())}
    assert names and not names & set(harness.SERVICES), names
    for cluster in names:
        assert harness.http(sidecar["users"], "GET", "/healthz", headers={"host": cluster}).status == 400, cluster
    assert harness.http(sidecar["users"], "GET", "/healthz",
                        headers={"host": gen.service_host("users")}).status == 200
    assert mesh.returncode is None
    if platform == "istio":
        by_service = {s: gen.istio_cluster(s) for s in harness.SERVICES}
    else:
        routes = load_yaml_all(ROOT / "deploy" / "envoy-gateway" / "demo-routes.yaml")[0]
        by_service = {}
        for i, rule in enumerate(routes["spec"]["rules"]):
            by_service.setdefault(rule["backendRefs"][0]["name"], f"httproute/default/{routes['metadata']['name']}/rule/{i}")
    assert names <= set(by_service.values()), (names, by_service)
    filters = []
    for f in FILTERS:
        entry = harness.wasm_filter(f, configs[f], fail_open=(f == "cache"))
        cfg = entry["typed_config"]["config"]
        if platform == "istio":  # Istio: plugin name <namespace>.<name>, no vm_id (one shared VM id)
            cfg["name"] = f"istio-system.tollgate-{f}"
            cfg["vm_config"]["vm_id"] = ""
        filters.append(entry)
    routes = [{"match": {"prefix": f"/api/{s}"},
               "route": {"cluster": by_service[s], "prefix_rewrite": f"/{s}", "timeout": "10s"}} for s in harness.SERVICES]
    routes.append({"match": {"prefix": "/"}, "direct_response": {"status": 404}})
    clusters = [harness.static_cluster(c, sidecar[s]) for s, c in by_service.items()]
    gw = envoy_factory(http_filters=filters, clusters=clusters, routes=routes)
    harness.wait_for(lambda: gw.stat("tollgate.auth.jwks_fetches") + gw.stat("tollgate.auth.jwks_fetch_failures") >= 1,
                     30, "the JWKS fetch")
    assert gw.stat("tollgate.auth.jwks_fetch_failures") == 0 and gw.stat("tollgate.auth.jwks_fetches") >= 1, \
        gw.stats("tollgate.auth")
    r = gw.get("/api/dashboard", headers={"x-api-key": "demo-key-pro"})  # the caller's own dashboard
    assert r.status == 200 and r.header("x-aggregate-complete") == "true", r
    body = r.json()
    assert body["user"] and body["company"], body
    assert gw.get("/api/products/1").status == 200


class _AnyName(set):
    """A `known` set for referenced_clusters that contains every name."""

    def __contains__(self, item):
        return True


def load_yaml_all(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


# The RBAC filters istio-agent puts in place of a Wasm plugin whose module it could not fetch
# (pkg/wasm/convert.go: denyHTTPTypedConfig / allowHTTPTypedConfig).
ISTIO_DENY_ALL = {"@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
                  "rules": {}, "rules_stat_prefix": "wasm-default-deny"}
ISTIO_ALLOW_ALL = {"@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
                   "rules_stat_prefix": "wasm-default-allow"}


def test_istio_unfetchable_module_answers_what_the_docs_say(services, envoy_factory):
    """FAIL_CLOSE: istio-agent's deny-all RBAC filter answers 403 `RBAC: access denied` (not a 5xx),
    counted in http.<listener>.rbac.denied; FAIL_OPEN: the allow-all one lets requests through."""
    deny = envoy_factory(services=services, http_filters=[
        {"name": "istio-system.tollgate-auth", "typed_config": ISTIO_DENY_ALL}])
    r = deny.get("/api/products/1")
    assert r.status == 403 and r.text == "RBAC: access denied", r
    assert deny.stat("http.gateway.rbac.wasm-default-deny.denied") == 1
    allow = envoy_factory(services=services, http_filters=[
        {"name": "istio-system.tollgate-cache", "typed_config": ISTIO_ALLOW_ALL}])
    assert allow.get("/api/products/1").status == 200
    # Under Istio's default stats inclusion list, that counter is not kept.
    cfg = harness.bootstrap(harness.free_port(), harness.free_port(),
                            [{"name": "istio-system.tollgate-auth", "typed_config": ISTIO_DENY_ALL}],
                            [harness.static_cluster(n, p) for n, p in services.ports.items()])
    cfg["stats_config"] = {"stats_matcher": ISTIO_STATS_MATCHER}
    istio_deny = envoy_factory(config=cfg)
    assert istio_deny.get("/api/products/1").status == 403
    assert not [k for k in istio_deny.stats() if "wasm-default-deny" in k]
    docs = (ROOT / "docs" / "deploy.md").read_text()
    assert "`403 Forbidden` with the body `RBAC: access denied`" in docs
    assert "`http.<stat prefix>.rbac.wasm-default-deny.denied`" in docs
    assert "applying deny RBAC filter" in docs


# Istio's default stats inclusion list (pkg/bootstrap/config.go and the bootstrap template): the
# stats an Istio proxy keeps unless proxyStatsMatcher adds more.
ISTIO_STATS_MATCHER = {"inclusion_list": {"patterns": [
    {"prefix": "reporter="}, {"prefix": "cluster_manager"}, {"prefix": "listener_manager"}, {"prefix": "server"},
    {"prefix": "cluster.xds-grpc"}, {"prefix": "wasm"}, {"suffix": "rbac.allowed"}, {"suffix": "rbac.denied"},
    {"suffix": "shadow_allowed"}, {"suffix": "shadow_denied"}, {"safe_regex": {"regex": "vhost\\..*\\.route\\..*"}},
    {"prefix": "component"}, {"prefix": "istio"}]}}


def istio_like_gateway(services, extra_patterns: list | None = None) -> dict:
    """The bundled filters as Istio configures them (plugin names <namespace>.<name>, no vm_id,
    Istio's stats inclusion list), with the bundled configuration's clusters."""
    cfg = harness.bundled_config(services)
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    for f in hcm["http_filters"]:
        if f["name"].startswith("tollgate."):
            c = f["typed_config"]["config"]
            c["name"] = f"istio-system.tollgate-{f['name'].split('.', 1)[1]}"
            c["vm_config"]["vm_id"] = ""
    matcher = json.loads(json.dumps(ISTIO_STATS_MATCHER))
    matcher["inclusion_list"]["patterns"] += extra_patterns or []
    cfg["stats_config"] = {"stats_matcher": matcher}
    return cfg


def test_istio_plugin_check_works_at_the_default_proxy_log_level(services, envoy_factory):
    """docs/deploy.md's check, on an Envoy configured like an Istio gateway at Istio's default log
    level (warning): the `VM started` line is not logged, the stats grep shows each plugin."""
    gw = envoy_factory(config=istio_like_gateway(services), log_level="warning")
    docs = (ROOT / "docs" / "deploy.md").read_text()
    pattern = re.search(r'grep -E "(\^wasm\\\.\$GW_NS[^"]*)"', docs).group(1).replace("$GW_NS", "istio-system")
    stats = harness.http(gw.admin_port, "GET", "/stats").text
    lines = [l for l in stats.splitlines() if re.search(pattern, l)]
    for f in FILTERS:
        mine = [l for l in lines if l.startswith(f"wasm.istio-system.tollgate-{f}.")]
        assert len(mine) == 4, (f, lines)
    assert gw.get("/api/products/1").status == 200
    stats = gw.stats("tollgate.")
    for f in FILTERS:
        assert harness.handled_in(stats, f) >= 1, (f, stats)
    assert "VM started" not in gw.log()


# ---------------------------------------------------------------------------------------------
# Envoy Gateway


@pytest.mark.parametrize("name", FILTERS + ("all",))
def test_envoy_gateway_policy_is_valid_and_configs_fit_the_filter_schemas(name):
    doc = load_yaml(ROOT / "deploy" / "envoy-gateway" / f"tollgate-{name}.yaml")
    assert not errors(deploy_validator("envoyextensionpolicy"), doc)
    wasm = doc["spec"]["wasm"]
    expected = list(FILTERS) if name == "all" else [name]
    assert [w["rootID"] for w in wasm] == [f"tollgate_{f}" for f in expected]
    for f, w in zip(expected, wasm):
        assert w["code"]["image"]["url"] == f"ghcr.io/tollgate-gw/tollgate-{f}:{VERSION}"
        assert w["failOpen"] is (f == "cache")
        assert not errors(harness.schema_validator(f), w["config"]), f


def test_envoy_gateway_schema_refuses_a_bad_policy():
    v = deploy_validator("envoyextensionpolicy")
    doc = load_yaml(ROOT / "deploy" / "envoy-gateway" / "tollgate-auth.yaml")
    assert not errors(v, doc)
    doc["spec"]["wasm"][0]["code"]["type"] = "HTTP"  # but no http source
    assert errors(v, doc)
    doc = load_yaml(ROOT / "deploy" / "envoy-gateway" / "tollgate-auth.yaml")
    del doc["spec"]["targetRefs"]
    assert errors(v, doc)


def test_envoy_gateway_demo_routes_give_the_clusters_the_configurations_call():
    """demo-routes.yaml routes each demo service in its own rule (one Service backendRef, no
    backendRef filters), so Envoy Gateway names its cluster httproute/<ns>/<name>/rule/<index>;
    every cluster the Envoy Gateway configurations call is one of those, and the callouts with a
    path carry the service's host name as :authority."""
    route, grant = load_yaml_all(ROOT / "deploy" / "envoy-gateway" / "demo-routes.yaml")
    assert not errors(deploy_validator("httproute"), route)
    assert not errors(deploy_validator("referencegrant"), grant)
    assert route["spec"]["parentRefs"] == [{"name": "eg"}] and route["metadata"]["namespace"] == "default"
    clusters = {}
    for i, rule in enumerate(route["spec"]["rules"]):
        (ref,) = rule["backendRefs"]
        assert "filters" not in ref and ref.get("kind", "Service") == "Service" and ref["port"] == 80, rule
        assert ref["name"] in harness.SERVICES and ref["namespace"] == "tollgate-demo", ref
        clusters.setdefault(ref["name"], f"httproute/default/{route['metadata']['name']}/rule/{i}")
    # The routes are envoy/envoy.yaml's, with the same rewrites, plus the aggregate endpoints.
    bundled = {(r["match"]["prefix"], r["route"]["prefix_rewrite"], r["route"]["cluster"])
               for r in bundled_envoy()["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
                   "typed_config"]["route_config"]["virtual_hosts"][0]["routes"] if "route" in r}
    eg = {(rule["matches"][0]["path"]["value"], rule["filters"][0]["urlRewrite"]["path"]["replacePrefixMatch"],
           rule["backendRefs"][0]["name"]) for rule in route["spec"]["rules"] if "filters" in rule}
    assert eg == bundled
    composite = [m["path"]["value"] for rule in route["spec"]["rules"] if "filters" not in rule for m in rule["matches"]]
    for r in harness.bundled_filter_configs()["aggregate"]["routes"]:
        path = r["match"].get("template") or r["match"].get("prefix") or r["match"].get("exact") or r["match"]["path"]
        assert any(path.startswith(p) for p in composite), path
    # Cross-namespace references are granted.
    assert grant["metadata"]["namespace"] == "tollgate-demo"
    assert grant["spec"]["from"] == [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": "default"}]
    assert grant["spec"]["to"] == [{"group": "", "kind": "Service"}]
    gen = gen_deploy()
    for name in FILTERS + ("all",):
        doc = load_yaml(ROOT / "deploy" / "envoy-gateway" / f"tollgate-{name}.yaml")
        for w in doc["spec"]["wasm"]:
            used = gen.referenced_clusters(w["config"], _AnyName())
            assert set(used) <= set(clusters.values()), (name, used)

            def walk(v):
                if isinstance(v, dict):
                    if v.get("cluster") in clusters.values() and "path" in v:
                        svc = next(s for s, c in clusters.items() if c == v["cluster"])
                        assert v["authority"] == gen.service_host(svc), v
                    for x in v.values():
                        walk(x)
                elif isinstance(v, list):
                    for x in v:
                        walk(x)
            walk(w["config"])
    # The docs' table says the same.
    docs = (ROOT / "docs" / "deploy.md").read_text()
    for svc, cluster in clusters.items():
        assert re.search(rf"^\| {svc} \| `{re.escape(cluster)}` \| `{re.escape(gen.service_host(svc))}` \|$", docs, re.M), svc


@pytest.mark.parametrize("name, mutation", [
    ("httproute", lambda d: d["spec"]["rules"][0].update(backendRef=d["spec"]["rules"][0].pop("backendRefs"))),
    ("httproute", lambda d: d["spec"]["rules"][0]["backendRefs"][0].pop("port")),
    ("httproute", lambda d: d["spec"]["rules"][0]["matches"][0]["path"].update(type="Prefix")),
    ("httproute", lambda d: d["spec"]["rules"][0]["filters"][0].pop("urlRewrite")),
    ("referencegrant", lambda d: d["spec"]["from"][0].pop("namespace")),
    ("referencegrant", lambda d: d["spec"].update(to=[])),
])
def test_gateway_api_schemas_refuse_what_the_crds_refuse(name, mutation):
    docs = {d["kind"].lower(): d for d in load_yaml_all(ROOT / "deploy" / "envoy-gateway" / "demo-routes.yaml")}
    doc = docs[name]
    assert not errors(deploy_validator(name), doc)
    mutation(doc)
    assert errors(deploy_validator(name), doc)


def test_deploy_docs_yaml_snippets_fit_their_schemas():
    """Every complete resource in docs/deploy.md's YAML blocks (the Backend example, ...) passes the
    schema of its kind."""
    kinds = {"Backend": "backend", "HTTPRoute": "httproute", "ReferenceGrant": "referencegrant",
             "WasmPlugin": "wasmplugin", "EnvoyExtensionPolicy": "envoyextensionpolicy"}
    seen = []
    for block in yaml_blocks(ROOT / "docs" / "deploy.md"):
        for doc in yaml.safe_load_all(block):
            if isinstance(doc, dict) and doc.get("kind") in kinds:
                assert not errors(deploy_validator(kinds[doc["kind"]]), doc), doc
                seen.append(doc["kind"])
    assert {"Backend", "HTTPRoute"} <= set(seen), seen
    backend = next(d for b in yaml_blocks(ROOT / "docs" / "deploy.md") for d in yaml.safe_load_all(b)
                   if isinstance(d, dict) and d.get("kind") == "Backend")
    backend["spec"]["tls"]["caCertificateRefs"] = [{"group": "", "kind": "ConfigMap", "name": "ca"}]
    assert errors(deploy_validator("backend"), backend)  # not both CA sources (a CEL rule)


# ---------------------------------------------------------------------------------------------
# Plain Envoy


def snippet_for_local_run(name: str, tmp_path: Path, config_override: str | None = None) -> Path:
    """deploy/envoy/tollgate-<name>.yaml with the module path pointing at build/."""
    doc = load_yaml(ROOT / "deploy" / "envoy" / f"tollgate-{name}.yaml")
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    wasm = hcm["http_filters"][0]["typed_config"]["config"]
    assert wasm["vm_config"]["code"]["local"]["filename"] == f"/etc/envoy/tollgate_{name}.wasm"
    wasm["vm_config"]["code"]["local"]["filename"] = str(harness.module_path(name))
    if config_override is not None:
        wasm["configuration"]["value"] = config_override
    path = tmp_path / f"tollgate-{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize("name", FILTERS)
def test_plain_envoy_snippet_validates_with_the_module(name, tmp_path):
    doc = load_yaml(ROOT / "deploy" / "envoy" / f"tollgate-{name}.yaml")
    filters = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
    assert [f["name"] for f in filters] == [f"tollgate.{name}", "envoy.filters.http.router"]
    r = validate_envoy(snippet_for_local_run(name, tmp_path))
    assert r.returncode == 0 and "OK" in r.stdout + r.stderr, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Deprecated field" not in r.stdout + r.stderr, r.stdout[-2000:] + r.stderr[-2000:]


def test_plain_envoy_validation_runs_the_filter_configuration(tmp_path):
    """--mode validate loads the module and configures it: a bad configuration fails it."""
    r = validate_envoy(snippet_for_local_run("ratelimit", tmp_path, '{"routes": [], "no_such_field": 1}'))
    assert r.returncode != 0
    assert "field `no_such_field`" in r.stdout + r.stderr


# ---------------------------------------------------------------------------------------------
# OCI image layouts and release artifacts


def read_layout(directory: Path) -> tuple[dict, dict, dict, bytes, list[tuple[dict, bytes]]]:
    """index, manifest, config, the module layer's bytes and the other layers (descriptor, bytes)
    of a one-image OCI layout, checking every digest."""
    assert json.loads((directory / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((directory / "index.json").read_text())
    assert index["schemaVersion"] == 2 and len(index["manifests"]) == 1

    def blob(desc: dict) -> bytes:
        algo, digest = desc["digest"].split(":")
        data = (directory / "blobs" / algo / digest).read_bytes()
        assert algo == "sha256" and sha256(data) == digest, desc
        assert len(data) == desc["size"], desc
        return data

    mdesc = index["manifests"][0]
    assert mdesc["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    manifest = json.loads(blob(mdesc))
    config = json.loads(blob(manifest["config"]))
    *docs, module_layer = manifest["layers"]
    layer = blob(module_layer)
    others = [(d, blob(d)) for d in docs]
    # Nothing else in the layout.
    blobs = {p.name for p in (directory / "blobs" / "sha256").iterdir()}
    assert blobs == {d["digest"].split(":")[1] for d in [mdesc, manifest["config"], *manifest["layers"]]}
    return index, manifest, config, layer, others


def test_oci_layouts_hold_each_module_as_plugin_wasm_after_its_docs(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "oci.py"), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    digests = json.loads((tmp_path / "digests.json").read_text())
    for name in FILTERS:
        index, manifest, config, layer, docs = read_layout(tmp_path / f"tollgate-{name}")
        assert index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == VERSION
        assert manifest["schemaVersion"] == 2
        assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
        assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
        assert manifest["annotations"]["module.wasm.image/variant"] == "compat"
        # Istio and Envoy Gateway take the module from the LAST layer of a compat image
        # (imagefetcher.go: layers[len(layers)-1], media type tar+gzip, file plugin.wasm).
        assert manifest["layers"][-1]["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
        tar_bytes = gzip.decompress(layer)
        with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
            members = tar.getmembers()
            assert [m.name for m in members] == ["plugin.wasm"] and members[0].isfile()
            data = tar.extractfile(members[0]).read()
        assert data == harness.module_path(name).read_bytes()
        # In front of it, as Higress does: the docs page and the configuration schema, one raw
        # file per layer, named by the title annotation (what `oras pull` writes).
        titles = {d["annotations"]["org.opencontainers.image.title"]: (d["mediaType"], body) for d, body in docs}
        assert set(titles) == {"README.md", f"{name}.schema.json"}
        assert titles["README.md"] == ("application/vnd.module.wasm.doc.v1+markdown",
                                       (ROOT / "docs" / "filters" / f"{name}.md").read_bytes())
        media, schema_bytes = titles[f"{name}.schema.json"]
        assert media == "application/schema+json"
        # The schema layer validates on its own (route-match embedded): the bundled configuration
        # passes, a misspelt field does not.
        bundled_schema = json.loads(schema_bytes)
        v = jsonschema.Draft202012Validator(bundled_schema)
        assert not list(v.iter_errors(harness.bundled_filter_configs()[name]))
        assert list(v.iter_errors({"routes": [{"match": {"prefx": "/"}}]}))
        # Every layer has its uncompressed digest in the config.
        raw = [body for _d, body in docs] + [tar_bytes]
        assert config["rootfs"] == {"type": "layers", "diff_ids": [f"sha256:{sha256(b)}" for b in raw]}
        assert digests[name]["manifest_sha256"] == index["manifests"][0]["digest"].split(":")[1]
        assert digests[name]["module_sha256"] == sha256(data)
    # Deterministic: the same modules give the same manifest digests.
    again = tmp_path / "again"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "oci.py"), "--out", str(again)], check=True,
                   capture_output=True, timeout=120)
    assert json.loads((again / "digests.json").read_text())["auth"]["manifest_sha256"] == \
        digests["auth"]["manifest_sha256"]


def test_oci_gzip_does_not_depend_on_the_zlib_library():
    """The module layer's gzip holds stored deflate blocks written by oci.py, so its bytes (and the
    digests in deploy/) are the same with zlib, zlib-ng or any other deflate implementation."""
    for data in (b"", b"x", bytes(range(256)) * 1000, harness.module_path("ratelimit").read_bytes()):
        out = oci.gzip_fixed(data)
        assert gzip.decompress(out) == data
        assert out[:10] == b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # no mtime, no name
        # Stored blocks: the input is in the stream as it is, 65535 bytes at a time.
        for i in range(0, len(data), 0xFFFF):
            assert data[i:i + 0xFFFF] in out
        assert len(out) == 10 + 5 * max(1, -(-len(data) // 0xFFFF)) + len(data) + 8


# ---------------------------------------------------------------------------------------------
# Reproducible modules: a pinned toolchain, no machine paths, the committed digests


def wasm_toolchain() -> str:
    """The toolchain scripts/wasm.sh chose for build/ (rustup or debian)."""
    choice = ROOT / "target" / ".wasm-toolchain"
    return choice.read_text().strip() if choice.exists() else "rustup"


def test_rust_toolchain_is_pinned_to_the_release_that_built_the_digests():
    import tomllib
    pin = tomllib.loads((ROOT / "rust-toolchain.toml").read_text())["toolchain"]
    # An exact release, not a moving channel, and no `targets`: on a machine where the rustup
    # server is out of reach, rustup would try to install them and hang; scripts/wasm.sh adds
    # wasm32-wasip1 itself when it can.
    assert re.fullmatch(r"\d+\.\d+\.\d+", pin["channel"]), pin
    assert "targets" not in pin, pin
    # The pin is the release rustup runs here (so the committed digests are this toolchain's) ...
    r = subprocess.run(["rustc", "--version"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith(f"rustc {pin['channel']} "), r.stdout + r.stderr
    # ... and the one the docs name, with the Debian fallback's version and its different digests.
    docs = (ROOT / "docs" / "deploy.md").read_text()
    assert f"Rust {pin['channel']}" in docs
    debian = re.search(r"`rustc-web` (\d+\.\d+\.\d+)\S*", docs)
    assert debian, "docs/deploy.md names the Debian rustc-web version"
    assert "digests differ" in docs


def test_modules_carry_no_machine_specific_paths():
    """Panic locations name source files: the Cargo home and the checkout are remapped
    (scripts/wasm.sh), so another machine's build gives the same bytes."""
    cargo_home = os.environ.get("CARGO_HOME", str(Path.home() / ".cargo"))
    for name in harness.MODULES:
        data = harness.module_path(name).read_bytes()
        for path in (cargo_home, str(ROOT), str(ROOT.resolve())):
            assert path.encode() not in data, f"{name}: the module names {path}; rebuild with `make build`"


def wasm_exports(data: bytes) -> dict[str, int]:
    """A wasm module's export section: name -> kind (0 function, 1 table, 2 memory, 3 global)."""
    assert data[:4] == b"\0asm", "not a wasm module"

    def uleb(i: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = data[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value, i

    i = 8
    while i < len(data):
        section, i = data[i], i + 1
        size, i = uleb(i)
        end = i + size
        if section == 7:
            count, i = uleb(i)
            out = {}
            for _ in range(count):
                length, i = uleb(i)
                name = data[i:i + length].decode()
                i += length
                out[name] = data[i]
                _, i = uleb(i + 1)
            assert i == end, "export section length"
            return out
        i = end
    return {}


# Every module: the ABI marker, the initializer, memory, and the entries each request, root or
# callout needs (docs/architecture.md, "What each module exports").
COMMON_EXPORTS = {
    "memory", "_initialize", "proxy_abi_version_0_2_1", "proxy_on_memory_allocate",
    "proxy_on_context_create", "proxy_on_vm_start", "proxy_on_configure", "proxy_on_tick",
    "proxy_on_request_headers", "proxy_on_http_call_response", "proxy_on_grpc_receive",
    "proxy_on_grpc_close",
}
# The optional hooks (RootFilter::HOOKS): Envoy enters a module only for those it exports;
# `proxy_on_done` only where the filter has work when a request ends.
HOOK_EXPORTS = {
    "auth": set(),
    "ratelimit": {"proxy_on_response_headers"},
    "cache": {"proxy_on_response_headers", "proxy_on_response_body", "proxy_on_done"},
    "aggregate": {"proxy_on_request_body", "proxy_on_response_headers", "proxy_on_done"},
    # The union of its children's.
    "tollgate": {"proxy_on_request_body", "proxy_on_response_headers", "proxy_on_response_body",
                 "proxy_on_done"},
    # The benchmarks' floor: every hook, as before.
    "probe": {"proxy_on_request_body", "proxy_on_response_headers", "proxy_on_response_body",
              "proxy_on_done"},
}


def test_each_module_exports_exactly_the_hooks_its_filter_uses():
    """A module exports the stream hooks its filter uses and no other entry point: no trailers,
    metadata, `proxy_on_log` or `proxy_on_delete` (each export Envoy calls is an entry into the
    VM, about 4 µs)."""
    assert set(HOOK_EXPORTS) == set(harness.MODULES)
    for name in harness.MODULES:
        exports = wasm_exports(harness.module_path(name).read_bytes())
        assert set(exports) == COMMON_EXPORTS | HOOK_EXPORTS[name], name
        assert exports["memory"] == 2
        assert all(kind == 0 for export, kind in exports.items() if export != "memory"), name


def test_wasm_export_reader_reads_a_handmade_module():
    # magic, version; a type section (skipped); an export section: "f" function 0, "memory" memory 0
    module = (b"\0asm\x01\0\0\0" + bytes([1, 4, 1, 0x60, 0, 0])
              + bytes([7, 14, 2, 1]) + b"f" + bytes([0, 0, 6]) + b"memory" + bytes([2, 0]))
    assert wasm_exports(module) == {"f": 0, "memory": 2}
    assert wasm_exports(b"\0asm\x01\0\0\0") == {}


def test_committed_digests_are_those_of_a_fresh_build():
    """deploy/ carries the image digests of the modules `make build` just wrote: the filter code,
    its docs page and its schema all go into the image, so a change to any of them needs
    `make manifests` (then commit deploy/)."""
    if wasm_toolchain() != "rustup":
        pytest.skip("build/ was made by Debian's rustc-web (scripts/wasm.sh fallback): its modules differ "
                    "from the pinned rustup toolchain's by design, so the committed digests cannot match")
    stale = []
    for name in FILTERS:
        digest = oci.image_for(name, VERSION).digest
        plugin = load_yaml(ROOT / "deploy" / "istio" / f"tollgate-{name}.yaml")
        policy = load_yaml(ROOT / "deploy" / "envoy-gateway" / f"tollgate-{name}.yaml")
        if plugin["spec"]["sha256"] != digest or policy["spec"]["wasm"][0]["code"]["image"]["sha256"] != digest:
            stale.append(name)
    assert not stale, (f"deploy/ has stale image digests for {', '.join(stale)}: the module, its docs page or "
                       "its schema changed. Run `make manifests` and commit deploy/.")


def test_generated_deploy_files_are_up_to_date():
    if wasm_toolchain() != "rustup":
        # Debian-built modules have other digests by design: compare everything but them.
        def mask(text):
            return re.sub(r"sha256: [0-9a-f]{64}", "sha256: <digest>", text)
        stale = [str(rel) for rel, text in gen_deploy().generate().items()
                 if mask(text) != mask((ROOT / rel).read_text() if (ROOT / rel).exists() else "")]
        assert not stale, f"out of date (run `make manifests`): {stale}"
        return
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen-deploy.py"), "--check"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def without_callout_targets(value):
    """A configuration without its cluster names and authorities."""
    if isinstance(value, dict):
        return {k: ("*" if k == "cluster" else without_callout_targets(v)) for k, v in value.items() if k != "authority"}
    if isinstance(value, list):
        return [without_callout_targets(v) for v in value]
    return value


def test_manifests_carry_the_oci_manifest_digest_of_the_modules():
    """What gen-deploy writes as sha256 is the manifest digest of scripts/oci.py's image."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import importlib.util
    spec = importlib.util.spec_from_file_location("gen_deploy", ROOT / "scripts" / "gen-deploy.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    files = gen.generate()
    for name in FILTERS:
        digest = oci.image_for(name, VERSION).digest
        plugin = yaml.safe_load(files[Path("deploy/istio") / f"tollgate-{name}.yaml"])
        assert plugin["spec"]["sha256"] == digest
        policy = yaml.safe_load(files[Path("deploy/envoy-gateway") / f"tollgate-{name}.yaml"])
        assert policy["spec"]["wasm"][0]["code"]["image"]["sha256"] == digest
        # The examples carry the bundled configuration of each filter (but for the cluster names
        # and authorities, checked by test_envoy_gateway_demo_routes_give_the_clusters_...).
        # (The ratelimit filter's global limits need a rate limit service the platform demos do
        # not have: gen-deploy leaves them out.)
        bundled = gen.platform_config(name, harness.bundled_filter_configs()[name])
        assert without_callout_targets(policy["spec"]["wasm"][0]["config"]) == without_callout_targets(bundled)


def test_dist_writes_a_clean_release_with_sums_over_every_file(tmp_path):
    out = tmp_path / "dist"
    out.mkdir()
    (out / "SHA256SUMS").write_text("")
    (out / "stale-from-an-old-release.wasm").write_bytes(b"old")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "dist.py"), "--out", str(out)],
                       capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in os.environ.items() if k != "TOLLGATE_REGISTRY"})
    assert r.returncode == 0, r.stderr
    assert not (out / "stale-from-an-old-release.wasm").exists(), "dist/ is replaced, not added to"
    for name in FILTERS:
        module = out / f"tollgate-{name}-{VERSION}.wasm"
        assert module.read_bytes() == harness.module_path(name).read_bytes()
        read_layout(out / "oci" / f"tollgate-{name}")
        assert (out / "schemas" / f"{name}.schema.json").read_text() == \
            (ROOT / "schemas" / f"{name}.schema.json").read_text()
        # The release's manifests are the repository's (same registry, same digests).
        assert (out / "deploy" / "istio" / f"tollgate-{name}.yaml").read_text() == \
            (ROOT / "deploy" / "istio" / f"tollgate-{name}.yaml").read_text()
    assert (out / "schemas" / "route-match.schema.json").exists()
    # The combined module too.
    assert (out / f"tollgate-{VERSION}.wasm").read_bytes() == harness.module_path("tollgate").read_bytes()
    read_layout(out / "oci" / "tollgate")
    assert (out / "deploy" / "istio" / "combined" / "tollgate.yaml").read_text() == \
        (ROOT / "deploy" / "istio" / "combined" / "tollgate.yaml").read_text()
    assert (out / "grafana" / "tollgate-dashboard.json").read_text() == DASHBOARD.read_text()
    # SHA256SUMS lists every file of the release but itself, OCI layouts included.
    listed = [line.split("  ", 1)[1] for line in (out / "SHA256SUMS").read_text().splitlines()]
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != "SHA256SUMS")
    assert listed == files
    assert any(f.startswith("oci/tollgate-auth/blobs/sha256/") for f in listed) and "oci/tollgate-auth/index.json" in listed
    check = subprocess.run(["sha256sum", "--strict", "-c", "SHA256SUMS"], cwd=out, capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    # A changed file, a layout blob included, is caught by the sums.
    blob = next((out / "oci" / "tollgate-cache" / "blobs" / "sha256").iterdir())
    blob.write_bytes(blob.read_bytes() + b"x")
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=out, capture_output=True, timeout=60)
    assert check.returncode != 0
    # A folder that is not a release is not replaced.
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "dist.py"), "--out", str(precious)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and (precious / "notes.txt").read_text() == "mine"


def test_make_release_checks_deploy_then_writes_a_clean_dist():
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^release:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe, "a `release` target"
    steps = recipe.group(1)
    order = [steps.index(s) for s in ("gen-deploy.py --check", "gen-dashboard.py --check", "rm -rf dist",
                                       "scripts/dist.py", "sha256sum")]
    assert order == sorted(order), steps
    assert "make manifests" in steps  # what the failure says to do


def test_release_workflow_builds_and_pushes_every_image():
    """.github/workflows/release.yml (for forks; not run here): on a version tag, `make release`,
    then every OCI layout pushed to the fork's registry, the pushed digest checked."""
    wf = load_yaml(ROOT / ".github" / "workflows" / "release.yml")
    triggers = wf.get("on", wf.get(True))
    assert "v*" in triggers["push"]["tags"]
    assert wf["permissions"]["packages"] == "write" and wf["permissions"]["contents"] == "write"
    steps = [st for job in wf["jobs"].values() for st in job["steps"]]
    runs = "\n".join(st.get("run", "") for st in steps)
    assert "make release" in runs
    assert "rustup target add wasm32-wasip1" in runs
    for st in steps:
        if "uses" in st:
            assert re.search(r"@v\d+$", st["uses"]), st["uses"]
    push = next(st["run"] for st in steps if "--from-oci-layout" in st.get("run", ""))
    loop = re.search(r"for f in ([a-z ]+); do", push).group(1).split()
    assert loop == list(FILTERS)
    assert "dist/oci/tollgate-$f:" in push and "manifest_sha256" in push
    # ghcr.io wants lower-case repository names; the owner may not be.
    assert ",," in runs or "tr '[:upper:]' '[:lower:]'" in runs
    docs = (ROOT / "docs" / "deploy.md").read_text()
    assert ".github/workflows/release.yml" in docs and "make release" in docs


# ---------------------------------------------------------------------------------------------
# Documentation


def test_deploy_docs_refer_to_files_that_exist():
    for doc in (ROOT / "docs" / "deploy.md", ROOT / "README.md"):
        text = doc.read_text()
        for path in set(re.findall(r"(?<![\w/.-])((?:deploy|scripts|services|envoy|schemas)/[\w./-]+\.\w+)", text)):
            assert (ROOT / path).exists(), f"{doc.name} refers to {path}, which does not exist"


def test_oci_dockerfile_builds_one_layer_with_plugin_wasm():
    lines = [l.strip() for l in (ROOT / "deploy" / "oci" / "Dockerfile").read_text().splitlines()
             if l.strip() and not l.strip().startswith("#")]
    assert lines[0] == "FROM scratch"
    layer_steps = [l for l in lines if l.split()[0] in ("COPY", "ADD", "RUN")]
    assert len(layer_steps) == 1 and layer_steps[0].startswith("COPY ")
    src, dst = layer_steps[0].split()[1:]
    assert dst.endswith("plugin.wasm")
    arg = next(l for l in lines if l.startswith("ARG FILTER"))
    default = arg.split("=", 1)[1]
    # The build context is build/: the source resolves to a built module.
    assert (harness.BUILD / src.replace("${FILTER}", default)).is_file()


def test_docker_path_pushes_one_manifest_and_names_the_digest_the_fetchers_compare():
    """A BuildKit build with attestations (the default) or the containerd store pushes an index;
    Istio and Envoy Gateway compare sha256 with the linux/amd64 image manifest's digest. The
    documented commands push one manifest and read that digest."""
    dockerfile = (ROOT / "deploy" / "oci" / "Dockerfile").read_text()
    docs = (ROOT / "docs" / "deploy.md").read_text()
    section = docs[docs.index("### With Docker"):docs.index("## Istio\n")]
    for text in (dockerfile, section):
        build = re.search(r"docker buildx build(?:\\\n|[^\n])*", text).group(0)
        for flag in ("--provenance=false", "--sbom=false", "--platform linux/amd64", "push=true"):
            assert flag in build, (flag, build)
        assert "crane digest --platform linux/amd64" in text
    assert not re.search(r"^\s+docker push", section, re.M), "no bare `docker push` command"
    assert "index" in section and "manifest" in section


def test_kubernetes_demo_matches_the_bundled_routes_and_the_istio_clusters():
    docs = [d for f in ("demo.yaml", "demo-istio.yaml")
            for d in yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / f).read_text()) if d]
    # The services alone carry no Istio kinds (they are applied on Envoy Gateway clusters too).
    assert not {d["apiVersion"].split("/")[0] for d in yaml.safe_load_all(
        (ROOT / "deploy" / "kubernetes" / "demo.yaml").read_text()) if d} & {"networking.istio.io"}
    by_kind: dict[str, list] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    services = {s["metadata"]["name"]: s for s in by_kind["Service"]}
    assert set(services) == set(harness.SERVICES)
    for name, svc in services.items():
        assert svc["metadata"]["namespace"] == "tollgate-demo"
        assert svc["spec"]["ports"][0]["port"] == 80
    for dep in by_kind["Deployment"]:
        c = dep["spec"]["template"]["spec"]["containers"][0]
        name = dep["metadata"]["name"]
        assert c["args"][:2] == ["--listen", f"{name}=0.0.0.0:{c['ports'][0]['containerPort']}"]
        assert services[name]["spec"]["ports"][0]["targetPort"] == c["ports"][0]["containerPort"]
        assert c["image"] == f"ghcr.io/tollgate-gw/tollgate-demo:{VERSION}"
    # The VirtualService has the bundled Envoy routes.
    routes = bundled_envoy()["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    envoy_routes = {(r["match"]["prefix"], r["route"]["prefix_rewrite"], r["route"]["cluster"])
                    for r in routes if "route" in r}
    vs = by_kind["VirtualService"][0]["spec"]["http"]
    istio_routes = {(h["match"][0]["uri"]["prefix"], h["rewrite"]["uri"],
                     h["route"][0]["destination"]["host"].split(".")[0]) for h in vs}
    assert istio_routes == envoy_routes
    assert by_kind["Namespace"][0]["metadata"]["labels"]["istio-injection"] == "enabled"
    # The cluster auth fetches its JWKS from serves it (--jwks, from the demo-jwks ConfigMap).
    users = next(d for d in by_kind["Deployment"] if d["metadata"]["name"] == "users")["spec"]["template"]["spec"]
    args = users["containers"][0]["args"]
    jwks_dir = str(Path(args[args.index("--jwks") + 1]).parent)
    assert users["containers"][0]["volumeMounts"][0]["mountPath"] == jwks_dir
    assert users["volumes"][0]["configMap"]["name"] == "demo-jwks"
    assert (ROOT / "envoy" / "demo-keys" / "jwks.json").is_file()


# Pod Security Standards, "restricted" (which includes "baseline"), as kubernetes/pod-security-admission
# checks them (policy/check_*.go). Ephemeral containers and Windows-only fields are left out.
RESTRICTED_VOLUME_SOURCES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "image",
                             "persistentVolumeClaim", "projected", "secret"}
BASELINE_CAPABILITIES = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                         "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}


def restricted_violations(pod: dict) -> list[str]:
    """What keeps a pod spec from passing Pod Security "restricted" (empty: it passes)."""
    out = []
    psc = pod.get("securityContext", {})
    containers = pod.get("containers", []) + pod.get("initContainers", [])
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            out.append(f"{key} must be false")
    for v in pod.get("volumes", []):
        kinds = set(v) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_SOURCES:
            out.append(f"volume {v['name']}: {kinds - RESTRICTED_VOLUME_SOURCES} not allowed")
    for sysctl in psc.get("sysctls", []):
        if sysctl["name"] not in SAFE_SYSCTLS:
            out.append(f"sysctl {sysctl['name']} not allowed")
    if psc.get("runAsUser") == 0:
        out.append("pod runAsUser 0")
    if psc.get("seLinuxOptions", {}).get("type", "") not in ("", "container_t", "container_init_t", "container_kvm_t",
                                                              "container_engine_t") or \
            {"user", "role"} & set(psc.get("seLinuxOptions", {})):
        out.append("pod seLinuxOptions not allowed")
    pod_seccomp = psc.get("seccompProfile", {}).get("type")
    if pod_seccomp not in (None, "RuntimeDefault", "Localhost"):
        out.append(f"pod seccompProfile {pod_seccomp}")
    if psc.get("appArmorProfile", {}).get("type", "RuntimeDefault") not in ("RuntimeDefault", "Localhost"):
        out.append("pod appArmorProfile")
    for c in containers:
        name, sc = c["name"], c.get("securityContext", {})
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation must be false")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            out.append(f"{name}: capabilities.drop must include ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: capabilities.add beyond NET_BIND_SERVICE")
        if not (sc.get("runAsNonRoot") is True or (psc.get("runAsNonRoot") is True and "runAsNonRoot" not in sc)):
            out.append(f"{name}: runAsNonRoot must be true")
        if sc.get("runAsUser") == 0:
            out.append(f"{name}: runAsUser 0")
        seccomp = sc.get("seccompProfile", {}).get("type", pod_seccomp)
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccompProfile must be RuntimeDefault or Localhost")
        if sc.get("procMount", "Default") != "Default":
            out.append(f"{name}: procMount")
        if sc.get("appArmorProfile", {}).get("type", "RuntimeDefault") not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: appArmorProfile")
        if sc.get("windowsOptions", {}).get("hostProcess"):
            out.append(f"{name}: hostProcess")
        if set(caps.get("add", [])) - BASELINE_CAPABILITIES:
            out.append(f"{name}: capabilities.add beyond baseline")
        for port in c.get("ports", []):
            if port.get("hostPort"):
                out.append(f"{name}: hostPort")
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            for handler in ("httpGet", "tcpSocket"):
                if c.get(probe, {}).get(handler, {}).get("host"):
                    out.append(f"{name}: {probe}.{handler}.host")
    return out


def demo_deployments() -> list[dict]:
    return [d for d in load_yaml_all(ROOT / "deploy" / "kubernetes" / "demo.yaml") if d["kind"] == "Deployment"]


def test_kubernetes_demo_passes_pod_security_restricted_with_resources():
    deployments = demo_deployments()
    assert len(deployments) == len(harness.SERVICES)
    for d in deployments:
        pod = d["spec"]["template"]["spec"]
        assert restricted_violations(pod) == [], d["metadata"]["name"]
        for c in pod["containers"]:
            res = c["resources"]
            assert {"cpu", "memory"} <= set(res["requests"]) and "memory" in res["limits"], c["name"]
    ns = next(d for d in load_yaml_all(ROOT / "deploy" / "kubernetes" / "demo.yaml") if d["kind"] == "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/warn"] == "restricted"


@pytest.mark.parametrize("mutation", [
    lambda p: p["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
    lambda p: p["containers"][0]["securityContext"]["capabilities"].update(drop=["NET_RAW"]),
    lambda p: p["containers"][0]["securityContext"]["capabilities"].update(add=["NET_ADMIN"]),
    lambda p: p["securityContext"].pop("runAsNonRoot"),
    lambda p: p["containers"][0]["securityContext"].update(runAsNonRoot=False),
    lambda p: p["containers"][0]["securityContext"].update(runAsUser=0),
    lambda p: p["securityContext"].pop("seccompProfile"),
    lambda p: p["containers"][0]["securityContext"].update(seccompProfile={"type": "Unconfined"}),
    lambda p: p["containers"][0]["securityContext"].update(privileged=True),
    lambda p: p.update(hostNetwork=True),
    lambda p: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
    lambda p: p["containers"][0]["ports"][0].update(hostPort=8080),
    lambda p: p["containers"][0]["securityContext"].update(procMount="Unmasked"),
    lambda p: p["containers"][0]["readinessProbe"]["httpGet"].update(host="10.0.0.1"),
    lambda p: p["securityContext"].update(sysctls=[{"name": "kernel.msgmax", "value": "1"}]),
])
def test_restricted_check_catches_each_rule(mutation):
    pod = json.loads(json.dumps(next(d for d in demo_deployments() if d["metadata"]["name"] == "users")
                                ["spec"]["template"]["spec"]))
    assert restricted_violations(pod) == []
    mutation(pod)
    assert restricted_violations(pod)


def test_demo_image_runs_as_a_non_root_user():
    dockerfile = (ROOT / "services" / "demo" / "Dockerfile").read_text()
    final = dockerfile[dockerfile.rindex("\nFROM "):]
    user = re.findall(r"^USER\s+(\S+)", final, re.M)
    assert user, "the runtime stage sets USER"
    uid = user[-1].split(":")[0]
    # Numeric, so Kubernetes can check runAsNonRoot without /etc/passwd; and not root.
    assert uid.isdigit() and int(uid) != 0, user
    for d in demo_deployments():
        assert d["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(uid)
    # The builder is the pinned toolchain (or rustup in the image would fetch it first).
    import tomllib
    pin = tomllib.loads((ROOT / "rust-toolchain.toml").read_text())["toolchain"]["channel"]
    assert re.search(rf"^FROM rust:{re.escape(pin)}-", dockerfile, re.M), pin


def test_wasmplugin_schema_accepts_istios_own_examples():
    """Examples from Istio's WasmPlugin reference, so that the schema is not stricter than Istio."""
    examples = yaml.safe_load_all("""
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {name: openid-connect, namespace: istio-ingress}
spec:
  selector: {matchLabels: {istio: ingressgateway}}
  url: file:///opt/filters/openid.wasm
  sha256: 1ef0c9a92b0420cf25f7fe5d481b231464bc88f486ca3b9c83ed5cc21d2f6210
  phase: AUTHN
  pluginConfig: {openid_server: authn, openid_realm: ingress}
---
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {name: openid-connect, namespace: istio-ingress}
spec:
  selector: {matchLabels: {istio: ingressgateway}}
  url: oci://private-registry:5000/openid-connect/openid:latest
  imagePullPolicy: IfNotPresent
  imagePullSecret: private-registry-pull-secret
  phase: AUTHN
  pluginConfig: {openid_server: authn, openid_realm: ingress}
  vmConfig:
    env:
    - {name: POD_NAME, valueFrom: HOST}
    - {name: TRUST_DOMAIN, value: cluster.local}
---
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {name: acl-check, namespace: istio-ingress}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: my-gateway}]
  url: https://private-bucket/filters/openid.wasm
  imagePullPolicy: Always
  phase: AUTHZ
  priority: 1000
  failStrategy: FAIL_OPEN
  match: [{mode: SERVER, ports: [{number: 8080}]}]
""")
    v = deploy_validator("wasmplugin")
    for doc in examples:
        assert not errors(v, doc), doc["metadata"]["name"]


def test_demo_dockerfile_rust_is_new_enough_for_the_demo_dependencies():
    """The Dockerfile's pinned Rust must build the demo's dependency tree as locked."""
    dockerfile = (ROOT / "services" / "demo" / "Dockerfile").read_text()
    pinned = re.search(r"^FROM rust:(\d+)\.(\d+)(?:\.(\d+))?-", dockerfile, re.M)
    assert pinned, "the builder image must be rust:<version>-..."
    have = tuple(int(x or 0) for x in pinned.groups())
    r = subprocess.run(["cargo", "metadata", "--format-version", "1", "--offline", "--locked",
                        "--filter-platform", "x86_64-unknown-linux-gnu"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.loads(r.stdout)
    packages = {p["id"]: p for p in meta["packages"]}
    nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
    todo = [next(p["id"] for p in meta["packages"] if p["name"] == "tollgate-demo")]
    seen: set[str] = set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        todo += [d["pkg"] for d in nodes[pid]["deps"] if any(k["kind"] in (None, "build") for k in d["dep_kinds"])]
    too_new = []
    for pid in seen:
        need = packages[pid].get("rust_version")
        if need and tuple(int(x) for x in (need.split(".") + ["0", "0"])[:3]) > have:
            too_new.append(f"{packages[pid]['name']} {packages[pid]['version']} needs Rust {need}")
    assert len(seen) > 1 and not too_new, too_new


def test_compose_health_checks_work_against_real_processes(services, envoy_factory, tmp_path):
    """The two health-check commands, run here against a real Envoy and the demo services."""
    c = compose()
    # Envoy's: bash + /dev/tcp against the admin port's /ready.
    envoy = envoy_factory(filters=[], services=services)
    check = c["services"]["envoy"]["healthcheck"]["test"][1:]
    admin = bundled_ports()["admin"]

    def run_envoy_check(port: int) -> int:
        cmd = [part.replace(f"127.0.0.1/{admin}", f"127.0.0.1/{port}") for part in check]
        return subprocess.run(cmd, capture_output=True, timeout=30).returncode

    assert run_envoy_check(envoy.admin_port) == 0
    assert run_envoy_check(harness.free_port()) != 0
    # The demo's: the script services/demo/Dockerfile writes, with the compose file's arguments.
    dockerfile = (ROOT / "services" / "demo" / "Dockerfile").read_text().replace("\\\n", "")
    fmt = re.search(r"printf '([^']*)'\s*>\s*/usr/local/bin/tollgate-demo-health", dockerfile).group(1)
    script = tmp_path / "tollgate-demo-health"
    subprocess.run(["sh", "-c", f"printf '{fmt}' > {script}"], check=True, timeout=10)
    ports = bundled_ports()
    args = [a for a in c["services"]["demo"]["healthcheck"]["test"][2:]]
    for name in harness.SERVICES:
        args = [a.replace(f"127.0.0.1:{ports[name]}", f"127.0.0.1:{services.ports[name]}") for a in args]
    assert len(args) == len(harness.SERVICES)
    assert subprocess.run(["sh", str(script), *args], timeout=30).returncode == 0
    assert subprocess.run(["sh", str(script), *args, f"127.0.0.1:{harness.free_port()}"], timeout=30).returncode != 0


def test_compose_demo_command_starts_the_demo_services(tmp_path):
    """The demo container's command line, given to the demo binary here (free ports, and the
    container paths mapped back to the repository), serves the three services and the JWKS."""
    demo = compose()["services"]["demo"]
    ports = {name: harness.free_port() for name in harness.SERVICES}
    args = []
    for arg in demo["command"]:
        mapped = host_path(demo, arg) if arg.startswith("/") else None
        if mapped is not None:
            arg = str(mapped)
        for name in harness.SERVICES:
            arg = re.sub(rf"^{name}=127\.0\.0\.1:\d+$", f"{name}=127.0.0.1:{ports[name]}", arg)
        args.append(arg)
    log = open(tmp_path / "demo.log", "wb")
    proc = subprocess.Popen([str(harness.demo_binary()), *args], stdout=log, stderr=subprocess.STDOUT)
    try:
        for name, port in ports.items():
            harness.wait_for(lambda p=port: harness.http(p, "GET", "/healthz", timeout=1).status == 200, 60,
                             f"demo {name} on {port}")
        jwks = harness.http(ports["users"], "GET", "/.well-known/jwks.json")
        assert jwks.status == 200 and jwks.json()["keys"], jwks
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("name", FILTERS)
def test_plain_envoy_snippet_serves_traffic(name, services, envoy_factory):
    """Each snippet, run by a real Envoy (ports moved to free ones, the backend and the callout
    clusters pointed at the demo services): /healthz passes through the filter."""
    doc = load_yaml(ROOT / "deploy" / "envoy" / f"tollgate-{name}.yaml")
    doc["admin"]["address"]["socket_address"]["port_value"] = harness.free_port()
    listener = doc["static_resources"]["listeners"][0]
    listener["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": harness.free_port()}
    wasm = listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][0]["typed_config"]["config"]
    wasm["vm_config"]["code"]["local"]["filename"] = str(harness.module_path(name))
    for cluster in doc["static_resources"]["clusters"]:
        target = services.ports["products"] if cluster["name"] == "backend" else services.ports[cluster["name"]]
        for ep in cluster["load_assignment"]["endpoints"]:
            for lb in ep["lb_endpoints"]:
                lb["endpoint"]["address"]["socket_address"]["port_value"] = target
    envoy = envoy_factory(config=doc)
    r = envoy.get("/healthz")
    assert r.status == 200, r
    # The filter saw it (a rule may count /healthz as skipped rather than handled).
    seen = {k: v for k, v in envoy.stats(f"tollgate.{name}.").items() if v}
    assert harness.handled_in(seen, name) + seen.get(f"wasmcustom.tollgate.{name}.skipped", 0) >= 1, seen


# ---------------------------------------------------------------------------------------------
# Metrics: the Grafana dashboard (deploy/grafana/), Prometheus and Grafana in Docker Compose

DASHBOARD = ROOT / "deploy" / "grafana" / "tollgate-dashboard.json"


def parse_exposition(text: str) -> list[tuple[str, dict[str, str]]]:
    """(name, labels) of every sample in Prometheus' text format."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+\S+$", line)
        assert m, line
        labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        out.append((m.group(1), labels))
    return out


def dashboard_queries(variables: dict[str, str] | None = None) -> list[str]:
    """Every PromQL expression of the dashboard, with its variables set (defaults, then `variables`)."""
    board = json.loads(DASHBOARD.read_text())
    values = {v["name"]: v.get("query", "") for v in board["templating"]["list"] if v["type"] == "textbox"}
    values.update(variables or {})
    values["__rate_interval"] = "1m"
    exprs = []
    for panel in board["panels"]:
        for t in panel.get("targets", []):
            expr = t["expr"]
            for name in sorted(values, key=len, reverse=True):
                expr = expr.replace("$" + name, values[name])
            exprs.append(expr)
    return exprs


def selectors(expr: str) -> list[tuple[str | None, list[tuple[str, str, str]]]]:
    """The series selectors of a PromQL expression: (metric name or None, [(label, op, value)])."""
    # Blank out string literals outside selectors so names inside label_replace's regexes do not count.
    out = []
    pos = 0
    pattern = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)?\{((?:[^{}"]|"(?:[^"\\]|\\.)*")*)\}|"(?:[^"\\]|\\.)*"|'
                         r'\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b')
    keywords = {"sum", "by", "rate", "increase", "histogram_quantile", "label_replace", "max", "min", "avg", "without",
                "count", "on", "ignoring", "and", "or", "unless", "offset", "le"}
    for m in pattern.finditer(expr, pos):
        if m.group(2) is not None:
            matchers = re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"', m.group(2))
            out.append((m.group(1), matchers))
        elif m.group(3) and m.group(3) not in keywords and not re.fullmatch(r"\d.*|[smhd]", m.group(3)):
            # A bare metric name (followed by `[` or `)`), or a label name in `by (...)`.
            follow = expr[m.end():m.end() + 1]
            if follow == "[" or (follow in ")" and m.group(3).startswith(("tollgate_", "envoy_"))):
                out.append((m.group(3), []))
    return out


def missing_series(exprs: list[str], samples: list[tuple[str, dict]]) -> list[str]:
    """The selectors of `exprs` that no sample matches."""
    missing = []
    for expr in exprs:
        sels = selectors(expr)
        assert sels, expr
        for name, matchers in sels:
            def ok(sample):
                sname, labels = sample
                if name is not None and sname != name:
                    return False
                for label, op, value in matchers:
                    actual = sname if label == "__name__" else labels.get(label, "")
                    hit = re.fullmatch(value, actual) is not None if op in ("=~", "!~") else actual == value
                    if hit != (op in ("=", "=~")):
                        return False
                return True
            if not any(ok(s) for s in samples):
                missing.append(f"{name or ''}{{{', '.join(f'{l}{o}{v!r}' for l, o, v in matchers)}}} in {expr}")
    return missing


def client(env, method: str, path: str, headers=None, source: str = "127.0.0.1") -> harness.Response:
    """A request from a chosen loopback address (each is its own client IP for the rate limits)."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", env.port, timeout=15, source_address=(source, 0))
    try:
        conn.request(method, path, headers=headers or {})
        r = conn.getresponse()
        return harness.Response(r.status, list(r.getheaders()), r.read(), 0.0)
    finally:
        conn.close()


def b64url(data: bytes) -> str:
    import base64
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unknown_kid_token(kid: str) -> str:
    import time as _time
    now = int(_time.time())
    header = {"alg": "ES256", "kid": kid, "typ": "JWT"}
    claims = {"iss": "https://demo.tollgate.local", "aud": "tollgate-demo", "sub": "dashboard-test",
              "iat": now, "exp": now + 600}
    return ".".join([b64url(json.dumps(header).encode()), b64url(json.dumps(claims).encode()), b64url(b"\0" * 64)])


PRO = {"x-api-key": "demo-key-pro"}


def drive_demo_traffic(env, svc) -> None:
    """Traffic through the bundled configuration that makes every filter emit the metrics the
    dashboard shows. Ordered by observable signals (stats, the demo's request log), never by time."""
    sources = iter(f"127.0.0.{i}" for i in range(2, 250))
    from auth_helpers import mint
    # An operator: may change products and read any user's dashboard (the bundled rules need it).
    ops = {"authorization": "Bearer " + mint(sub="ops", scopes="products:write dashboard:any orders:read",
                                         claims={"plan": "pro"})}
    harness.wait_for(lambda: env.stat("tollgate.auth.jwks_fetches") >= 1, 60, "the demo provider's keys")
    # Cache: a miss that is stored, then hits; a stale entry revalidated (304); a stale entry served
    # while it is refreshed; an unsafe method that invalidates. Products are anonymous: each client
    # address has its own rate limit (10 a minute).
    ip = next(sources)
    assert [client(env, "GET", "/api/products/1", source=ip).status for _ in range(3)] == [200] * 3
    ip = next(sources)
    for _ in range(2):
        assert client(env, "GET", "/api/products/2?cache_control=public,max-age=0", source=ip).status == 200
    ip = next(sources)
    for _ in range(2):
        assert client(env, "GET", "/api/products/3?cache_control=public,max-age=0,stale-while-revalidate=60",
                      source=ip).status == 200
    assert client(env, "POST", "/api/products/1", ops, source=next(sources)).status == 201
    # Collapsed: a second request for a URL whose fetch is under way (held at products until
    # released) waits for it.
    import threading
    ip = next(sources)
    held = "/api/products/4?hold=ship-collapse"
    answers: list = []
    threads = [threading.Thread(target=lambda: answers.append(client(env, "GET", held, source=ip)))
               for _ in range(2)]
    try:
        threads[0].start()
        svc.wait_held("ship-collapse")
        threads[1].start()
        harness.wait_for(lambda: env.stat("http.gateway.downstream_rq_active") >= 2, 60,
                         "the second request to wait for the first fetch")
    finally:
        svc.release("ship-collapse")
    for t in threads:
        t.join(20)
    assert [a.status for a in answers] == [200, 200], answers
    assert svc.hold_state("ship-collapse")["arrived"] == 1, "the second request did not wait for the first fetch"
    # Rate limiting: the 11th anonymous request from one address in a minute is refused.
    ip = next(sources)
    assert [client(env, "GET", "/api/products/1", source=ip).status for _ in range(11)][-1] == 429
    # Authentication: refusals by reason, an API key, an anonymous request on an optional route.
    assert client(env, "GET", "/api/orders/1").status == 401
    assert client(env, "GET", "/api/orders/1", {"authorization": "Bearer not.a.token"}).status == 401
    assert client(env, "GET", "/api/orders/1", {"x-api-key": "no-such-key"}).status == 401
    assert client(env, "GET", "/api/orders/1", PRO).status == 200
    assert client(env, "GET", "/api/dashboard/1", source=next(sources)).status == 401
    # Aggregation: complete, partial (the optional orders call times out), failed (no such user).
    r = client(env, "GET", "/api/dashboard/1", ops)
    assert r.status == 200 and r.header("x-aggregate-complete") == "true", r
    r = client(env, "GET", "/api/dashboard/1", {**ops, "x-demo-delay": "1500"})
    assert r.status == 200 and r.header("x-aggregate-complete") == "false", r
    assert client(env, "GET", "/api/dashboard/999999", ops).status == 502
    # A backend's breaker (users: the orders call forwards a client header, so it has none): with
    # the services down it opens after its failures; back up, a probe after the cool-down closes it.
    ports = dict(svc.ports)
    svc.stop()
    harness.wait_for(lambda: client(env, "GET", "/api/dashboard/1", ops) and
                     env.stat("tollgate.aggregate.breaker.users.opened") >= 1, 60, "the users breaker to open")
    svc = harness.DemoServices.start(ports=ports)
    try:
        harness.wait_for(lambda: client(env, "GET", "/api/dashboard/1", ops) and
                         env.stat("tollgate.aggregate.breaker.users.closed") >= 1, 60,
                         "the users breaker to close again", interval=0.5)
        # Key fetches: with the key server gone, an unknown key id makes a refetch that fails.
        svc.stop()
        assert client(env, "GET", "/api/orders/1", {"authorization": "Bearer " + unknown_kid_token("rotated")}).status in (401, 503)
    finally:
        svc.stop()
    harness.wait_for(lambda: env.stat("tollgate.auth.jwks_fetch_failures") >= 1, 60, "the failed key refetch")


def test_dashboard_queries_name_metrics_the_demo_emits(envoy_factory):
    """The bundled demo (envoy/envoy.yaml on a real Envoy, the demo services), traffic through
    every filter, then /stats/prometheus: every series the dashboard's queries select exists.
    A metric renamed in a filter fails here: rename it in scripts/gen-dashboard.py too (then
    `make manifests`)."""
    svc = harness.DemoServices.start()
    try:
        env = envoy_factory(config=harness.bundled_config(svc))
        drive_demo_traffic(env, svc)
    finally:
        svc.stop()
    scrape = harness.http(env.admin_port, "GET", "/stats/prometheus").text
    samples = parse_exposition(scrape)
    missing = missing_series(dashboard_queries(), samples)
    assert not missing, "the dashboard queries metrics the demo does not emit:\n" + "\n".join(missing)
    # The check can fail: a misspelt metric is reported.
    assert missing_series(["sum(rate(tollgate_cache_hitz[1m]))"], samples)
    assert missing_series(['rate({__name__=~"tollgate_auth_denied_nope_.+"}[1m])'], samples)


def test_dashboard_is_generated_and_well_formed():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen-dashboard.py"), "--check"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    board = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    titles = " ".join(p["title"] for p in board["panels"])
    for needed in ("Refused, by reason", "Refusals per limit", "Hit ratio", "Cache-Status outcomes",
                   "Answers per endpoint", "Circuit breakers", "Key fetches", "Gateway latency"):
        assert needed in titles, needed
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for p in board["panels"]:
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"] and all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"]), p["title"]
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]


def test_compose_prometheus_scrapes_the_bundled_envoy_and_grafana_shows_the_dashboard(services, envoy_factory):
    c = compose()["services"]
    prom, grafana = c["prometheus"], c["grafana"]
    for svc in (prom, grafana):
        assert svc["network_mode"] == "host"
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", svc["image"]), svc["image"]
        assert svc["healthcheck"]["test"][0] == "CMD"
    assert prom["depends_on"]["envoy"]["condition"] == "service_healthy"
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"
    # Prometheus' configuration, through its mount: Envoy's admin port, /stats/prometheus.
    flag = next(a for a in prom["command"] if a.startswith("--config.file="))
    config = load_yaml(host_path(prom, flag.split("=", 1)[1]))
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/stats/prometheus"
    (target,) = job["static_configs"][0]["targets"]
    assert target == f"127.0.0.1:{bundled_ports()['admin']}"
    listen = next(a for a in prom["command"] if a.startswith("--web.listen-address=")).split("=", 1)[1]
    assert listen.startswith("127.0.0.1:")
    # That scrape, on a real Envoy with the bundled configuration: Prometheus' text format with the
    # filters' metrics.
    env = envoy_factory(config=harness.bundled_config(services))
    assert env.get("/api/products/1").status == 200
    r = harness.http(env.admin_port, "GET", job["metrics_path"])
    assert r.status == 200 and "text/plain" in (r.header("content-type") or "")
    names = {n for n, _ in parse_exposition(r.text)}
    assert "tollgate_cache_misses" in names
    # Grafana: the data source is that Prometheus; the dashboard provider reads the mounted
    # deploy/grafana/, which holds the generated dashboard; the home dashboard is it.
    ds = load_yaml(host_path(grafana, "/etc/grafana/provisioning/datasources/prometheus.yml"))["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"] == f"http://{listen}"
    provider = load_yaml(host_path(grafana, "/etc/grafana/provisioning/dashboards/tollgate.yml"))["providers"][0]
    folder = host_path(grafana, provider["options"]["path"])
    assert folder == DASHBOARD.parent and (folder / DASHBOARD.name).is_file()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert host_path(grafana, home) == DASHBOARD
    assert grafana["environment"]["GF_SERVER_HTTP_ADDR"] == "127.0.0.1"


# The tag extractor Istio's bootstrap uses for HTTP connection managers (pkg/bootstrap; Istio
# also turns Envoy's default tag extractors off), and the stat prefix it gives a gateway listener.
ISTIO_HCM_TAG = {"tag_name": "http_conn_manager_prefix",
                 "regex": "^http\\.(((?:[_.[:digit:]\\w]*|[_\\[\\]aAbBcCdDeEfF[:digit:]\\w\\:]*));\\.)"}


def test_dashboard_on_an_istio_gateway_with_the_documented_settings(services, envoy_factory):
    """Under Istio's stats settings (its inclusion list, its tag extractor, no default tags, the
    gateway listener's stat prefix): every Tollgate metric is kept; the Gateway row's metrics exist
    with deploy/grafana/istio-gateway-stats.yaml and the `gateway` value docs/deploy.md gives, and
    not without that patch."""
    patch = load_yaml(ROOT / "deploy" / "grafana" / "istio-gateway-stats.yaml")
    proxy_config = yaml.safe_load(patch["spec"]["template"]["metadata"]["annotations"]["proxy.istio.io/config"])
    extra = [{"safe_regex": {"regex": r}} for r in proxy_config["proxyStatsMatcher"]["inclusionRegexps"]]
    docs = (ROOT / "docs" / "deploy.md").read_text()
    gateway = re.search(r"set\s+the\s+dashboard's\s+`gateway`\s+variable\s+to\s+`([^`]+)`", docs).group(1)
    assert gateway in (ROOT / "deploy" / "grafana" / "istio-gateway-stats.yaml").read_text()

    def istio_gateway(patterns):
        cfg = istio_like_gateway(services, patterns)
        cfg["stats_config"].update(stats_tags=[ISTIO_HCM_TAG], use_all_default_tags=False)
        hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["stat_prefix"] = "outbound_0.0.0.0_8080;"
        env = envoy_factory(config=cfg)
        for path in ("/api/products/1", "/api/orders/1", "/api/dashboard/1"):
            env.get(path, headers=PRO)
        return env

    env = istio_gateway(extra)
    samples = parse_exposition(harness.http(env.admin_port, "GET", "/stats/prometheus").text)
    names = {n for n, _ in samples}
    # Every filter metric Envoy has is in the Prometheus output (Istio's `wasm` prefix keeps them).
    custom = {k[len("wasmcustom."):].replace(".", "_").replace("-", "_") for k in env.stats() if k.startswith("wasmcustom.")}
    assert custom and custom <= names, custom - names
    gateway_row = [e for e in dashboard_queries({"gateway": gateway}) if "tollgate_" not in e]
    assert gateway_row and not missing_series(gateway_row, samples), missing_series(gateway_row, samples)
    # Without the patch, Istio drops them.
    plain = istio_gateway([])
    samples = parse_exposition(harness.http(plain.admin_port, "GET", "/stats/prometheus").text)
    assert missing_series([e for e in gateway_row if "downstream_rq" in e], samples)


# ---------------------------------------------------------------------------------------------
# The combined module (build/tollgate.wasm): one WasmPlugin, one policy, one plain-Envoy snippet


def test_istio_combined_wasmplugin_holds_the_chain_in_authn():
    doc = load_yaml(ROOT / "deploy" / "istio" / "combined" / "tollgate.yaml")
    assert not errors(deploy_validator("wasmplugin"), doc)
    spec = doc["spec"]
    assert spec["url"] == f"oci://ghcr.io/tollgate-gw/tollgate:{VERSION}"
    assert spec["sha256"] == oci.image_for("tollgate", VERSION).digest
    assert (spec["phase"], spec["failStrategy"], spec["pluginName"]) == ("AUTHN", "FAIL_CLOSE", "tollgate")
    assert list(spec["pluginConfig"]) == list(FILTERS)
    problems = errors(harness.schema_validator("tollgate"), spec["pluginConfig"])
    assert not problems, problems
    # Its callouts go to the demo's Istio clusters, as in the single plugins.
    assert spec["pluginConfig"] == {f: wasm_plugins()[f]["spec"]["pluginConfig"] for f in FILTERS}


def test_envoy_gateway_combined_policy_is_valid():
    doc = load_yaml(ROOT / "deploy" / "envoy-gateway" / "tollgate-combined.yaml")
    assert not errors(deploy_validator("envoyextensionpolicy"), doc)
    [wasm] = doc["spec"]["wasm"]
    assert wasm["rootID"] == "tollgate" and wasm["failOpen"] is False
    assert wasm["code"]["image"]["url"] == f"ghcr.io/tollgate-gw/tollgate:{VERSION}"
    assert not errors(harness.schema_validator("tollgate"), wasm["config"])
    singles = load_yaml(ROOT / "deploy" / "envoy-gateway" / "tollgate-all.yaml")["spec"]["wasm"]
    assert wasm["config"] == {f: w["config"] for f, w in zip(FILTERS, singles)}


def test_plain_envoy_combined_snippet_validates_with_the_module(tmp_path):
    doc = load_yaml(ROOT / "deploy" / "envoy" / "tollgate.yaml")
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert [f["name"] for f in hcm["http_filters"]] == ["tollgate", "envoy.filters.http.router"]
    wasm = hcm["http_filters"][0]["typed_config"]["config"]
    assert wasm["vm_config"]["code"]["local"]["filename"] == "/etc/envoy/tollgate.wasm"
    wasm["vm_config"]["code"]["local"]["filename"] = str(harness.module_path("tollgate"))
    path = tmp_path / "tollgate.yaml"
    path.write_text(yaml.safe_dump(doc))
    r = validate_envoy(path)
    assert r.returncode == 0 and "OK" in r.stdout + r.stderr, r.stdout[-2000:] + r.stderr[-2000:]


def readme_checks(readme: str) -> list[tuple[str, list[str]]]:
    """The README's demo commands with the answer it shows, in order: the token assignments
    (`TOKEN=$(make -s token ...)`, expected None) and every command that prints a status code or
    a `grep -o` match with that output written under it (`# 200`, or after a `$ ` prompt the lines
    that follow), and `curl -si` commands whose status line and headers it shows. Loops are left out: how many of a burst pass is the rate limit tests' business."""
    lines = [l[4:] for l in readme.splitlines() if l.startswith("    ")]
    checks = []
    for i, line in enumerate(lines):
        prompt = line.startswith("$ ")
        cmd = line[2:] if prompt else line
        if re.match(r"^[A-Z]+=\$\(make -s token[^)]*\)$", cmd):
            checks.append((cmd, None))
            continue
        if not cmd.startswith("curl ") or "for i in" in cmd:
            continue
        headers_only = cmd.startswith("curl -si ") and "|" not in cmd and not prompt
        if not ("%{http_code}\\n'" in cmd or re.search(r"\| grep -oE? '[^']*'$", cmd) or headers_only):
            continue
        expected = []
        for nxt in lines[i + 1:]:
            if prompt:
                if nxt.startswith("$ ") or not nxt.strip():
                    break
                expected.append(nxt)
            else:
                if not nxt.startswith("# "):
                    break
                expected.append(nxt[2:])
        if "%{http_code}" in cmd:
            expected = expected[:1] and [expected[0].split()[0]]
        if headers_only:  # the status line and the headers shown (a subset: no date, no length)
            expected = ["HEADERS"] + expected[:expected.index("") if "" in expected else len(expected)]
        checks.append((cmd, expected))
    return checks


def test_readme_demo_answers_match_the_bundled_gateway(envoy_factory):
    """README's "Try it" commands give the answers it shows, against envoy/envoy.yaml as `make
    run` starts it (users and orders require the gateway's identity)."""
    services = harness.DemoServices.start(require_identity=("users", "orders"))
    try:
        cfg = harness.bundled_config(services)
        envoy = envoy_factory(config=cfg)
        harness.wait_for(lambda: envoy.stat("tollgate.auth.jwks_fetches") >= 1, 60, "the demo provider's keys")
        env = harness.user_env()
        checks = readme_checks((ROOT / "README.md").read_text())
        assert sum(e is not None for _, e in checks) >= 5, checks
        for cmd, expected in checks:
            cmd = cmd.replace("127.0.0.1:10000", f"127.0.0.1:{envoy.port}").replace(
                "127.0.0.1:9901", f"127.0.0.1:{envoy.admin_port}")
            if expected is None:
                name = cmd.split("=", 1)[0]
                out = subprocess.run(["bash", "-c", f'{cmd}; printf %s "${name}"'], cwd=ROOT, env=env,
                                     capture_output=True, text=True, timeout=60, check=True).stdout
                env[name] = out
                continue
            out = subprocess.run(["bash", "-c", cmd], cwd=ROOT, env=env, capture_output=True, text=True,
                                 timeout=60).stdout
            if expected[:1] == ["HEADERS"]:
                got = [l.rstrip("\r") for l in out.splitlines()]
                assert all(e in got for e in expected[1:]), (cmd, expected[1:], got)
            else:
                assert out.splitlines() == expected, (cmd, out)
    finally:
        services.stop()
