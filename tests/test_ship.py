"""Shipping: Docker Compose, Istio WasmPlugins, Envoy Gateway policies, plain-Envoy snippets, OCI
image layouts and release artifacts. No Docker engine or Kubernetes runs here, so these tests
check the files against what they refer to, the published schemas, and a real Envoy in
`--mode validate`."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
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
    assert set(services) == {"demo", "envoy"}
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


def read_layout(directory: Path) -> tuple[dict, dict, dict, bytes]:
    """index, manifest, config and layer bytes of a one-image OCI layout, checking every digest."""
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
    assert len(manifest["layers"]) == 1
    layer = blob(manifest["layers"][0])
    # Nothing else in the layout.
    blobs = {p.name for p in (directory / "blobs" / "sha256").iterdir()}
    assert blobs == {d["digest"].split(":")[1] for d in [mdesc, manifest["config"], *manifest["layers"]]}
    return index, manifest, config, layer


def test_oci_layouts_hold_each_module_as_plugin_wasm(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "oci.py"), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    digests = json.loads((tmp_path / "digests.json").read_text())
    for name in FILTERS:
        index, manifest, config, layer = read_layout(tmp_path / f"tollgate-{name}")
        assert index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == VERSION
        assert manifest["schemaVersion"] == 2
        assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
        assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
        assert manifest["layers"][0]["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
        assert manifest["annotations"]["module.wasm.image/variant"] == "compat"
        # The layer is a gzipped tar holding exactly plugin.wasm: the module, byte for byte.
        tar_bytes = gzip.decompress(layer)
        assert config["rootfs"] == {"type": "layers", "diff_ids": [f"sha256:{sha256(tar_bytes)}"]}
        with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
            members = tar.getmembers()
            assert [m.name for m in members] == ["plugin.wasm"] and members[0].isfile()
            data = tar.extractfile(members[0]).read()
        assert data == harness.module_path(name).read_bytes()
        assert digests[name]["manifest_sha256"] == index["manifests"][0]["digest"].split(":")[1]
        assert digests[name]["module_sha256"] == sha256(data)
    # Deterministic: the same modules give the same manifest digests.
    again = tmp_path / "again"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "oci.py"), "--out", str(again)], check=True,
                   capture_output=True, timeout=120)
    assert json.loads((again / "digests.json").read_text())["auth"]["manifest_sha256"] == \
        digests["auth"]["manifest_sha256"]


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
        # The examples carry the bundled configuration of each filter.
        bundled = harness.bundled_filter_configs()[name]
        assert policy["spec"]["wasm"][0]["config"] == bundled


def test_dist_writes_versioned_modules_sums_schemas_and_layouts(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "dist.py"), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for name in FILTERS:
        module = tmp_path / f"tollgate-{name}-{VERSION}.wasm"
        assert module.read_bytes() == harness.module_path(name).read_bytes()
        read_layout(tmp_path / "oci" / f"tollgate-{name}")
        assert (tmp_path / "schemas" / f"{name}.schema.json").read_text() == \
            (ROOT / "schemas" / f"{name}.schema.json").read_text()
    assert (tmp_path / "schemas" / "route-match.schema.json").exists()
    assert (tmp_path / f"tollgate-{VERSION}.wasm").read_bytes() == harness.module_path("tollgate").read_bytes()
    read_layout(tmp_path / "oci" / "tollgate")
    sums = (tmp_path / "SHA256SUMS").read_text().splitlines()
    assert len(sums) == len(oci.MODULES) + len(list((ROOT / "schemas").glob("*.schema.json")))
    check = subprocess.run(["sha256sum", "--strict", "-c", "SHA256SUMS"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    # A changed file is caught by the sums.
    (tmp_path / f"tollgate-auth-{VERSION}.wasm").write_bytes(b"\0asm-tampered")
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=tmp_path, capture_output=True, timeout=60)
    assert check.returncode != 0


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


def test_kubernetes_demo_matches_the_bundled_routes_and_the_istio_clusters():
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / "demo.yaml").read_text()) if d]
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
            harness.wait_for(lambda p=port: harness.http(p, "GET", "/healthz", timeout=1).status == 200, 15,
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
    assert seen.get(f"wasmcustom.tollgate.{name}.requests", 0) + seen.get(f"wasmcustom.tollgate.{name}.skipped", 0) >= 1, \
        seen


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
    # Its clusters are the demo's Istio clusters, as in the single plugins.
    assert "outbound|80||users.tollgate-demo.svc.cluster.local" in json.dumps(spec["pluginConfig"])


def test_envoy_gateway_combined_policy_is_valid():
    doc = load_yaml(ROOT / "deploy" / "envoy-gateway" / "tollgate-combined.yaml")
    assert not errors(deploy_validator("envoyextensionpolicy"), doc)
    [wasm] = doc["spec"]["wasm"]
    assert wasm["rootID"] == "tollgate" and wasm["failOpen"] is False
    assert wasm["code"]["image"]["url"] == f"ghcr.io/tollgate-gw/tollgate:{VERSION}"
    assert wasm["config"] == harness.bundled_combined_config()
    assert not errors(harness.schema_validator("tollgate"), wasm["config"])


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
