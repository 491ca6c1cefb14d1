#!/usr/bin/env python3
"""Generate the deployment examples under deploy/ from the bundled Envoy configuration.

    scripts/gen-deploy.py            # (re)write deploy/{istio,envoy-gateway,envoy}/...
    scripts/gen-deploy.py --check    # exit 1 and name the files that are out of date
    scripts/gen-deploy.py --registry registry.example.com/platform --out /tmp/mine   # your own copy

Each Tollgate filter's JSON configuration in envoy/envoy.yaml is the source of:

- deploy/istio/tollgate-<filter>.yaml         an Istio WasmPlugin (pluginConfig = that configuration)
- deploy/envoy-gateway/tollgate-<filter>.yaml an Envoy Gateway EnvoyExtensionPolicy with that filter
- deploy/envoy-gateway/tollgate-all.yaml      one EnvoyExtensionPolicy with the four filters in order
- deploy/envoy-gateway/demo-routes.yaml       the demo's HTTPRoute and ReferenceGrant (whose clusters the
                                              Envoy Gateway configurations call out to)
- deploy/envoy/tollgate-<filter>.yaml         a minimal plain-Envoy configuration loading that module
- deploy/kubernetes/demo.yaml                 (hand-written; with --registry, its images are renamed)

and the same configurations, as the sections of the combined module (build/tollgate.wasm: the four
filters in one VM; envoy/envoy.yaml loads it), are the source of:

- deploy/istio/combined/tollgate.yaml         one WasmPlugin in phase AUTHN holding the whole chain
                                              (a folder of its own: `kubectl apply -f deploy/istio/`
                                              must not install both variants)
- deploy/envoy-gateway/tollgate-combined.yaml one EnvoyExtensionPolicy with the combined module
- deploy/envoy/tollgate.yaml                  a minimal plain-Envoy configuration loading it
- deploy/kubernetes/demo-istio.yaml           (hand-written; with --istio-gateway helm, its selector follows)

The `sha256` of the Istio and Envoy Gateway examples is the digest of the OCI image manifest that
scripts/oci.py builds from build/tollgate_<filter>.wasm (what both fetchers verify), so build the
modules first (`make build`, or `make manifests` which does both).

In the Istio examples, values of configuration keys named `cluster` or `*_cluster` that name one of
the demo's clusters (users, orders, products) become the Istio cluster of the demo's Kubernetes
Service, `outbound|80||<name>.<namespace>.svc.cluster.local` (see deploy/kubernetes/demo.yaml),
and their callouts get the service's host name as `authority`. In the Envoy Gateway examples they
become the clusters Envoy Gateway makes for the rules of demo-routes.yaml,
`httproute/default/tollgate-demo/rule/<index>`.

`--istio-gateway helm` writes the WasmPlugins for a gateway installed with Istio's Helm `gateway`
chart (namespace istio-ingress, pods labelled istio=ingress) instead of istioctl's default.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import oci  # noqa: E402  (scripts/oci.py)

ROOT = oci.ROOT
FILTERS = oci.FILTERS
COMBINED = oci.COMBINED
DEMO_NAMESPACE = "tollgate-demo"
# The two ways Istio installs an ingress gateway, and the labels of its pods (what a WasmPlugin's
# selector must name; Istio's manifests/charts/gateways/istio-ingress and manifests/charts/gateway):
#   istioctl: `istioctl install` (default profile): Deployment istio-ingressgateway in istio-system,
#             pods labelled istio=ingressgateway, listeners 8080 and 8443 (Service ports 80, 443).
#   helm:     `helm install istio-ingress istio/gateway -n istio-ingress`: the chart labels pods
#             istio=<release name without "istio-">, so istio=ingress; listeners 80 and 443.
# The WasmPlugins set no `match.ports`: Istio then attaches them to every listener of the gateway.
ISTIO_LAYOUTS = {
    "istioctl": {"namespace": "istio-system", "labels": {"istio": "ingressgateway"}, "workload": "istio-ingressgateway"},
    "helm": {"namespace": "istio-ingress", "labels": {"istio": "ingress"}, "workload": "istio-ingress"},
}
ISTIO_LAYOUT = "istioctl"
EG_GATEWAY = "eg"
EG_NAMESPACE = "default"
# The HTTPRoute that gives the demo services their routes (and Envoy clusters) on the Gateway.
EG_ROUTE = "tollgate-demo"

# Where each filter goes in the chain, and what happens when its module cannot run.
#   Istio runs phases in the order AUTHN, AUTHZ, STATS (then UNSPECIFIED, before the router) and,
#   within a phase, higher priority first: auth -> ratelimit -> cache -> aggregate.
PLACEMENT = {
    "auth": {"phase": "AUTHN", "priority": 100, "failStrategy": "FAIL_CLOSE",
             "why": "who is calling; fails closed: no module, no unauthenticated traffic"},
    "ratelimit": {"phase": "AUTHZ", "priority": 100, "failStrategy": "FAIL_CLOSE",
                  "why": "after authentication (limits may key on the caller); fails closed"},
    "cache": {"phase": "STATS", "priority": 20, "failStrategy": "FAIL_OPEN",
              "why": "after rate limiting, before aggregation; fails open: without it requests reach the service"},
    "aggregate": {"phase": "STATS", "priority": 10, "failStrategy": "FAIL_CLOSE",
                  "why": "last before the router (lower priority than cache in the same phase); fails closed: "
                         "the services have no aggregate routes of their own"},
}

# The combined module runs the whole chain, authentication first, so it goes where auth goes: one
# WasmPlugin in phase AUTHN, failing closed (no module, no unauthenticated traffic).
COMBINED_PLACEMENT = {"phase": "AUTHN", "priority": 100, "failStrategy": "FAIL_CLOSE",
                      "why": "the whole chain, auth -> ratelimit -> cache -> aggregate, in one VM; in AUTHN "
                             "because it authenticates first; fails closed"}


def placement(f: str) -> dict:
    return COMBINED_PLACEMENT if f == COMBINED else PLACEMENT[f]


GENERATED = "# Generated by scripts/gen-deploy.py from envoy/envoy.yaml: edit those, then run `make manifests`.\n"


# ---------------------------------------------------------------------------------------------
# Reading the bundled configuration


SOURCE = ROOT / "envoy" / "envoy.yaml"


def bundled() -> dict:
    return yaml.safe_load(SOURCE.read_text())


def hcm_of(cfg: dict) -> dict:
    return cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def filter_configs(cfg: dict) -> dict[str, dict]:
    """filter name -> its JSON configuration (parsed), in chain order: the sections of the
    combined module's entry (`tollgate`), or the entries of single modules (`tollgate.<filter>`)."""
    out = {}
    for f in hcm_of(cfg)["http_filters"]:
        name = f.get("name", "")
        value = f.get("typed_config", {}).get("config", {}).get("configuration", {}).get("value", "") or "{}"
        if name == COMBINED:
            sections = json.loads(value)
            out.update((k, sections[k]) for k in FILTERS if k in sections)
        elif name.startswith("tollgate."):
            out[name.split(".", 1)[1]] = json.loads(value)
    return out


def platform_config(f: str, config: dict) -> dict:
    """A filter's configuration for the platform examples. The ratelimit filter's global limits
    are left out: they need a rate limit service (tollgate-rls and Redis, which `make run` and
    Docker Compose start), and the Kubernetes demo has none yet; the local limits stay."""
    if f != "ratelimit" or "rate_limit_service" not in config:
        return config
    out = {k: v for k, v in config.items() if k != "rate_limit_service"}
    dropped = {l["name"] for l in config.get("limits", []) if "global" in l}
    out["limits"] = [l for l in config.get("limits", []) if l["name"] not in dropped]
    out["routes"] = [dict(r, limits=[n for n in r["limits"] if n not in dropped]) if "limits" in r else r
                     for r in config.get("routes", [])]
    return out


def clusters(cfg: dict) -> dict[str, dict]:
    return {c["name"]: c for c in cfg["static_resources"].get("clusters", [])}


def is_cluster_key(key: str) -> bool:
    k = key.lower()
    return k == "cluster" or k.endswith("_cluster") or k.endswith("cluster_name")


def referenced_clusters(value, known: set[str]) -> list[str]:
    """Names of `known` clusters used as values of cluster keys anywhere in a configuration."""
    found: list[str] = []

    def walk(v, key=""):
        if isinstance(v, dict):
            for k, x in v.items():
                walk(x, k)
        elif isinstance(v, list):
            for x in v:
                walk(x, key)
        elif isinstance(v, str) and is_cluster_key(key) and v in known and v not in found:
            found.append(v)

    walk(value)
    return found


def rename_clusters(value, mapping: dict[str, str], hosts: dict[str, str] | None = None):
    """Rename the clusters of `mapping` in cluster keys. A callout with a fixed path (a JWKS or
    introspection fetch, an aggregate call: an object with `cluster` and `path`) whose cluster is
    renamed also gets `authority` = the service's host name from `hosts`, unless it has one: by
    default the filters send the cluster name as `:authority`, and Istio's and Envoy Gateway's
    cluster names (`outbound|80||...`, `httproute/...`) are not valid host names, which an Envoy in
    front of the service (an Istio sidecar) refuses with 400."""
    hosts = hosts or {}
    if isinstance(value, dict):
        out = {k: (mapping.get(v, v) if isinstance(v, str) and is_cluster_key(k) else rename_clusters(v, mapping, hosts))
               for k, v in value.items()}
        cluster = value.get("cluster")
        if isinstance(cluster, str) and cluster in hosts and "path" in value and "authority" not in value:
            out["authority"] = hosts[cluster]
        return out
    if isinstance(value, list):
        return [rename_clusters(v, mapping, hosts) for v in value]
    return value


def service_host(service: str) -> str:
    return f"{service}.{DEMO_NAMESPACE}.svc.cluster.local"


def istio_cluster(service: str) -> str:
    return f"outbound|80||{service_host(service)}"


# ---------------------------------------------------------------------------------------------
# YAML output


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper, data: str):
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str)


def dump(doc) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=110)


def labels(f: str, version: str) -> dict:
    return {"app.kubernetes.io/name": oci.image_name(f), "app.kubernetes.io/part-of": "tollgate",
            "app.kubernetes.io/version": version}


# ---------------------------------------------------------------------------------------------
# The documents


def wasm_plugin(f: str, config: dict, version: str, digest: str, known: set[str]) -> str:
    place = placement(f)
    layout = ISTIO_LAYOUTS[ISTIO_LAYOUT]
    mapping = {c: istio_cluster(c) for c in known}
    name = oci.image_name(f)
    doc = {
        "apiVersion": "extensions.istio.io/v1alpha1",
        "kind": "WasmPlugin",
        "metadata": {"name": name, "namespace": layout["namespace"], "labels": labels(f, version)},
        "spec": {
            "selector": {"matchLabels": dict(layout["labels"])},
            "url": f"oci://{oci.image_ref(f, version)}",
            "sha256": digest,
            "imagePullPolicy": "IfNotPresent",
            "pluginName": name.replace("-", "_"),
            "phase": place["phase"],
            "priority": place["priority"],
            "failStrategy": place["failStrategy"],
            "type": "HTTP",
            # No `ports`: every listener of the selected gateway (HTTP and HTTPS, and any port
            # added later) gets the filter. Listing ports leaves the other listeners unfiltered.
            "match": [{"mode": "CLIENT"}],
            "pluginConfig": rename_clusters(config, mapping, {c: service_host(c) for c in known}),
        },
    }
    what = "the combined module tollgate" if f == COMBINED else f"tollgate.{f}"
    folder = "deploy/istio/combined/" if f == COMBINED else "deploy/istio/"
    head = (GENERATED
            + f"# Istio WasmPlugin: {what} on the ingress gateway {layout['workload']} in {layout['namespace']}\n"
            + f"# ({place['why']}), on all of its listeners.\n"
            + ("# Instead of the four plugins of deploy/istio/, not with them.\n" if f == COMBINED else "")
            + f"#   kubectl apply -f {folder}   (after pushing the images, see docs/deploy.md)\n"
            + "# sha256 is the digest of the OCI image manifest (what Istio verifies for oci:// URLs),\n"
            + "# as written by `make oci`; per-route rules live in pluginConfig.routes, not in Istio.\n")
    return head + dump(doc)


def envoy_routes(cfg: dict) -> list[dict]:
    return hcm_of(cfg)["route_config"]["virtual_hosts"][0]["routes"]


def eg_cluster(rule: int) -> str:
    """The Envoy cluster Envoy Gateway makes for rule `rule` of the demo's HTTPRoute (a rule with one
    Service backendRef and no backendRef filters): internal/gatewayapi/helpers.go,
    irRouteDestinationName = "<route kind>/<namespace>/<name>/rule/<index>"."""
    return f"httproute/{EG_NAMESPACE}/{EG_ROUTE}/rule/{rule}"


def eg_demo_routes(cfg: dict, configs: dict[str, dict], version: str) -> tuple[str, dict[str, str]]:
    """The demo's HTTPRoute (the routes of envoy/envoy.yaml, plus the aggregate filter's composite
    paths) and ReferenceGrant, and the EG cluster of each demo service."""
    rules, mapping = [], {}
    for r in envoy_routes(cfg):
        action = r.get("route")
        if not action or "prefix" not in r.get("match", {}):
            continue  # the bundled "/" -> 404: Envoy Gateway answers 404 without a route
        service = action["cluster"]
        rule = {
            "matches": [{"path": {"type": "PathPrefix", "value": r["match"]["prefix"]}}],
            "backendRefs": [{"name": service, "namespace": DEMO_NAMESPACE, "port": 80}],
        }
        if "prefix_rewrite" in action:
            rule["filters"] = [{"type": "URLRewrite", "urlRewrite": {
                "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": action["prefix_rewrite"]}}}]
        if "timeout" in action:
            rule["timeouts"] = {"request": action["timeout"]}
        mapping.setdefault(service, eg_cluster(len(rules)))
        rules.append(rule)
    # The aggregate filter answers its composite endpoints itself, but Envoy Gateway enables Wasm
    # filters per route (they are disabled on the listener), so those paths need a route too.
    prefixes = []
    for route in configs.get("aggregate", {}).get("routes", []):
        m = route.get("match", {})
        prefix = m.get("prefix") or m.get("path") or (m.get("template", "").split("{", 1)[0].rstrip("/") or None)
        if prefix and prefix not in prefixes:
            prefixes.append(prefix)
    if prefixes and rules:
        rules.append({"matches": [{"path": {"type": "PathPrefix", "value": p}} for p in prefixes],
                      "backendRefs": [dict(rules[0]["backendRefs"][0])]})
    route = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": EG_ROUTE, "namespace": EG_NAMESPACE,
                     "labels": {"app.kubernetes.io/part-of": "tollgate", "app.kubernetes.io/version": version}},
        "spec": {"parentRefs": [{"name": EG_GATEWAY}], "rules": rules},
    }
    grant = {
        "apiVersion": "gateway.networking.k8s.io/v1beta1",
        "kind": "ReferenceGrant",
        "metadata": {"name": f"{EG_ROUTE}-from-{EG_NAMESPACE}", "namespace": DEMO_NAMESPACE,
                     "labels": {"app.kubernetes.io/part-of": "tollgate", "app.kubernetes.io/version": version}},
        "spec": {"from": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": EG_NAMESPACE}],
                 "to": [{"group": "", "kind": "Service"}]},
    }
    names = ", ".join(f"{svc} -> {c}" for svc, c in mapping.items())
    head = (GENERATED
            + f"# The demo's routes on the Envoy Gateway quickstart's Gateway `{EG_GATEWAY}` (namespace {EG_NAMESPACE}),\n"
            + f"# to the services of deploy/kubernetes/demo.yaml (namespace {DEMO_NAMESPACE}; the ReferenceGrant lets\n"
            + "# the route in default use them). Envoy Gateway names each rule's cluster\n"
            + "# httproute/<namespace>/<name>/rule/<index>; the filter configurations in this folder call these:\n"
            + f"#   {names}\n"
            + "# so keep the rule order (and one Service backendRef per rule) when you edit this file.\n")
    return head + dump(route) + "---\n" + dump(grant), mapping


def eg_wasm_entry(f: str, config: dict, version: str, digest: str) -> dict:
    name = oci.image_name(f)
    return {
        "name": name,
        "rootID": name.replace("-", "_"),
        "code": {
            "type": "Image",
            "image": {"url": oci.image_ref(f, version), "sha256": digest},
            "pullPolicy": "IfNotPresent",
        },
        "config": config,
        "failOpen": placement(f)["failStrategy"] == "FAIL_OPEN",
    }


def eg_policy(name: str, entries: list[dict], version: str, comment: str) -> str:
    doc = {
        "apiVersion": "gateway.envoyproxy.io/v1alpha1",
        "kind": "EnvoyExtensionPolicy",
        "metadata": {"name": name, "namespace": EG_NAMESPACE,
                     "labels": {"app.kubernetes.io/part-of": "tollgate", "app.kubernetes.io/version": version}},
        "spec": {
            "targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": EG_GATEWAY}],
            "wasm": entries,
        },
    }
    return GENERATED + comment + dump(doc)


# Keys of the bundled HTTP connection manager that are not the edge settings: the snippets have
# their own. Every other key (use_remote_address, xff_num_trusted_hops, header and path
# sanitizing, ...) is copied, so a snippet trusts clients exactly as envoy/envoy.yaml does.
HCM_OWN_KEYS = {"@type", "stat_prefix", "codec_type", "route_config", "rds", "http_filters"}


def edge_settings(cfg: dict) -> dict:
    """The bundled HTTP connection manager's settings other than its routes and filters."""
    return {k: v for k, v in hcm_of(cfg).items() if k not in HCM_OWN_KEYS}


def envoy_snippet(f: str, config: dict, all_clusters: dict[str, dict], edge: dict | None = None) -> str:
    used = referenced_clusters(config, set(all_clusters))
    name = oci.image_name(f).replace("-", "_")
    module = oci.module_path(Path("/etc/envoy"), f)
    cl = [{
        "name": "backend",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "backend", "endpoints": [{"lb_endpoints": [{"endpoint": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": 8080}}}}]}]},
    }] + [all_clusters[c] for c in used]
    doc = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 9901}}},
        "static_resources": {
            "listeners": [{
                "name": "gateway",
                "address": {"socket_address": {"address": "0.0.0.0", "port_value": 10000}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                                 ".HttpConnectionManager",
                        "stat_prefix": "gateway",
                        **(edge or {}),
                        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
                            {"match": {"prefix": "/"}, "route": {"cluster": "backend"}}]}]},
                        "http_filters": [
                            {
                                "name": COMBINED if f == COMBINED else f"tollgate.{f}",
                                "typed_config": {
                                    "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                                    "config": {
                                        "name": name,
                                        "root_id": name,
                                        "vm_config": {
                                            "vm_id": name,
                                            "runtime": "envoy.wasm.runtime.v8",
                                            "code": {"local": {"filename": str(module)}},
                                        },
                                        "configuration": {
                                            "@type": "type.googleapis.com/google.protobuf.StringValue",
                                            "value": json.dumps(config, indent=2) + "\n",
                                        },
                                        # fail_open is deprecated (Envoy 1.36+ warn about it).
                                        "failure_policy": "FAIL_OPEN" if placement(f)["failStrategy"] == "FAIL_OPEN"
                                        else "FAIL_CLOSED",
                                    },
                                },
                            },
                            {"name": "envoy.filters.http.router", "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
                        ],
                    },
                }]}],
            }],
            "clusters": cl,
        },
    }
    what = "the combined module tollgate (the four filters)" if f == COMBINED else f"tollgate.{f} alone"
    head = (GENERATED
            + f"# Minimal plain-Envoy configuration with {what} in front of one backend\n"
            + f"# (127.0.0.1:8080). Put {module.name} at /etc/envoy/ and run:\n"
            + f"#   envoy -c {oci.image_name(f)}.yaml\n"
            + "# Other clusters are the ones the filter's configuration calls out to. The connection manager's\n"
            + "# edge settings are envoy/envoy.yaml's (the client address is the TCP peer; see\n"
            + "# docs/filters/ratelimit.md#deployment-shapes behind a load balancer).\n")
    return head + dump(doc)


def generate(version: str | None = None, build: Path = ROOT / "build") -> dict[Path, str]:
    """Every generated file (path relative to the repository root) and its contents."""
    version = version or oci.workspace_version()
    cfg = bundled()
    configs = {f: platform_config(f, c) for f, c in filter_configs(cfg).items()}
    all_clusters = clusters(cfg)
    known = set(all_clusters)
    out: dict[Path, str] = {}
    entries = []
    eg_routes_doc, eg_mapping = eg_demo_routes(cfg, configs, version)
    out[Path("deploy/envoy-gateway/demo-routes.yaml")] = eg_routes_doc
    eg_hosts = {c: service_host(c) for c in eg_mapping}
    for f in FILTERS:
        config = configs.get(f, {})
        digest = oci.image_for(f, version, build).digest
        out[Path("deploy/istio") / f"tollgate-{f}.yaml"] = wasm_plugin(f, config, version, digest, known)
        entry = eg_wasm_entry(f, rename_clusters(config, eg_mapping, eg_hosts), version, digest)
        entries.append(entry)
        out[Path("deploy/envoy-gateway") / f"tollgate-{f}.yaml"] = eg_policy(
            f"tollgate-{f}", [entry], version,
            f"# Envoy Gateway: tollgate.{f} alone on the Gateway `{EG_GATEWAY}`. One EnvoyExtensionPolicy per target:\n"
            "# a second one on the same Gateway is Conflicted, so to run several filters use tollgate-all.yaml.\n"
            "# Callouts go to the clusters of demo-routes.yaml (apply it too).\n")
    out[Path("deploy/envoy-gateway/tollgate-all.yaml")] = eg_policy(
        "tollgate", entries, version,
        f"# Envoy Gateway: the four filters on the Gateway `{EG_GATEWAY}`, in this order\n"
        "# (auth -> ratelimit -> cache -> aggregate); the wasm list is the filter order.\n"
        "# Callouts go to the clusters of demo-routes.yaml (apply it too).\n")
    for f in FILTERS:
        out[Path("deploy/envoy") / f"tollgate-{f}.yaml"] = envoy_snippet(f, configs.get(f, {}), all_clusters,
                                                                        edge_settings(cfg))
    # The combined module: the same configurations, a section each.
    combined = {f: configs[f] for f in FILTERS if f in configs}
    digest = oci.image_for(COMBINED, version, build).digest
    out[Path("deploy/istio/combined/tollgate.yaml")] = wasm_plugin(COMBINED, combined, version, digest, known)
    out[Path("deploy/envoy-gateway/tollgate-combined.yaml")] = eg_policy(
        "tollgate-combined", [eg_wasm_entry(COMBINED, rename_clusters(combined, eg_mapping, eg_hosts), version,
                                            digest)], version,
        f"# Envoy Gateway: the combined module on the Gateway `{EG_GATEWAY}`: the four filters in one VM\n"
        "# (auth -> ratelimit -> cache -> aggregate), one configuration with a section per filter.\n"
        "# Use it instead of tollgate-all.yaml (one EnvoyExtensionPolicy per target).\n"
        "# Callouts go to the clusters of demo-routes.yaml (apply it too).\n")
    out[Path("deploy/envoy/tollgate.yaml")] = envoy_snippet(COMBINED, combined, all_clusters, edge_settings(cfg))
    # The Kubernetes demo is written by hand; its image names follow the registry, and its Istio
    # Gateway's selector the gateway layout.
    demo = Path("deploy/kubernetes/demo.yaml")
    out[demo] = (ROOT / demo).read_text().replace(f"{oci.DEFAULT_REGISTRY}/", f"{oci.REGISTRY}/")
    demo_istio = Path("deploy/kubernetes/demo-istio.yaml")
    default_sel = "selector: {%s}" % ", ".join(f"{k}: {v}" for k, v in ISTIO_LAYOUTS["istioctl"]["labels"].items())
    sel = "selector: {%s}" % ", ".join(f"{k}: {v}" for k, v in ISTIO_LAYOUTS[ISTIO_LAYOUT]["labels"].items())
    out[demo_istio] = (ROOT / demo_istio).read_text().replace(default_sel, sel)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="only report files that differ from what would be written")
    p.add_argument("--version", default=None, help="image tag (default: the Cargo workspace version)")
    p.add_argument("--build", type=Path, default=ROOT / "build", help="where the modules are (default: build/)")
    p.add_argument("--registry", default=None,
                   help=f"image registry and path (default: {oci.REGISTRY}; or set TOLLGATE_REGISTRY)")
    p.add_argument("--out", type=Path, default=ROOT,
                   help="write <out>/deploy/... instead of the repository's deploy/ (for your own copy)")
    p.add_argument("--istio-gateway", choices=sorted(ISTIO_LAYOUTS), default=ISTIO_LAYOUT,
                   help="how Istio's ingress gateway was installed: istioctl (istio-ingressgateway in istio-system, "
                        "the default) or helm (the istio/gateway chart as release istio-ingress in istio-ingress)")
    p.add_argument("--source", type=Path, default=SOURCE,
                   help="the Envoy configuration to take the filter configurations from (default: envoy/envoy.yaml)")
    args = p.parse_args(argv)
    globals()["SOURCE"] = args.source
    globals()["ISTIO_LAYOUT"] = args.istio_gateway
    if args.registry:
        oci.REGISTRY = args.registry.rstrip("/")
    files = generate(args.version, args.build)
    stale = []
    for rel, text in files.items():
        path = args.out / rel
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        stale.append(str(rel))
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if args.check:
        if stale:
            print("gen-deploy: out of date (run `make manifests`): " + ", ".join(stale), file=sys.stderr)
            return 1
        print("gen-deploy: deploy/ is up to date")
        return 0
    print(f"gen-deploy: wrote {len(stale)} file(s), {len(files) - len(stale)} unchanged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
