#!/usr/bin/env python3
"""Write the Tollgate Grafana dashboard, deploy/grafana/tollgate-dashboard.json.

    scripts/gen-dashboard.py           # (re)write it
    scripts/gen-dashboard.py --check   # exit 1 when the file differs from what would be written

The panels query the metrics as Envoy's /stats/prometheus names them: a filter's metric
`tollgate.<filter>.<name>` (shown as `wasmcustom.tollgate...` in /stats) becomes
`tollgate_<filter>_<name>` (dots and dashes become underscores, no `envoy_` prefix), Envoy's own
stats become `envoy_...` with their tags as labels. Families whose names carry a variable part
(a refusal reason, a limit, an endpoint, a backend cluster) are selected with `__name__=~` and
that part is turned into a label with label_replace, inside a subquery (`[$__rate_interval:]`),
because rate() drops the metric name. tests/test_ship.py runs the demo, drives traffic through
every filter and checks that every metric these queries name exists in /stats/prometheus.

Variables: `datasource` (a Prometheus data source) and `gateway`, the label matcher that picks the
gateway's HTTP connection manager in Envoy's own stats: `envoy_http_conn_manager_prefix="gateway"`
for envoy/envoy.yaml (Docker Compose, `make run`); for Istio see docs/deploy.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "deploy" / "grafana" / "tollgate-dashboard.json"
RATE = "$__rate_interval"
DS = {"type": "prometheus", "uid": "${datasource}"}


def family(regex: str, label: str, capture: str, exclude: str | None = None) -> str:
    """The series of a metric family, with the variable part of their names as `label`."""
    sel = f'__name__=~"{regex}"' + (f', __name__!~"{exclude}"' if exclude else "")
    return f'label_replace({{{sel}}}, "{label}", "$1", "__name__", "{capture}")'


def family_rate(regex: str, label: str, capture: str, exclude: str | None = None) -> str:
    return f"sum by ({label}) (rate({family(regex, label, capture, exclude)}[{RATE}:]))"


def rate(metric: str) -> str:
    return f"sum(rate({metric}[{RATE}]))"


class Board:
    def __init__(self):
        self.panels: list[dict] = []
        self.y = 0
        self.x = 0
        self.row_h = 0

    def row(self, title: str):
        self.newline()
        self.panels.append({"type": "row", "title": title, "collapsed": False,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.y += 1

    def newline(self):
        if self.x:
            self.y += self.row_h
        self.x, self.row_h = 0, 0

    def panel(self, kind: str, title: str, description: str, targets: list[tuple[str, str]], w: int = 8,
              h: int = 8, unit: str | None = None, extra: dict | None = None):
        if self.x + w > 24:
            self.newline()
        fields: dict = {"defaults": {}, "overrides": []}
        if unit:
            fields["defaults"]["unit"] = unit
        p = {
            "type": kind, "title": title, "description": description, "datasource": DS,
            "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y},
            "targets": [{"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend}
                        for i, (expr, legend) in enumerate(targets)],
            "fieldConfig": fields,
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}} if kind == "timeseries" else
                       {"reduceOptions": {"calcs": ["lastNotNull"]}},
        }
        if extra:
            p.update(extra)
        self.panels.append(p)
        self.x += w
        self.row_h = max(self.row_h, h)

    def done(self) -> list[dict]:
        for i, p in enumerate(self.panels, start=1):
            p["id"] = i
        return self.panels


def dashboard() -> dict:
    b = Board()
    gw = "{$gateway}"

    b.row("Gateway")
    b.panel("stat", "Requests per second", "Requests through the gateway's HTTP connection manager.",
            [(f"sum(rate(envoy_http_downstream_rq_total{gw}[{RATE}]))", "requests/s")], w=4, unit="reqps")
    b.panel("timeseries", "Gateway latency",
            "Downstream request time at the gateway (all filters and the upstream), percentiles.",
            [(f"histogram_quantile({q}, sum by (le) (rate(envoy_http_downstream_rq_time_bucket{gw}[{RATE}])))", f"p{int(q * 100)}")
             for q in (0.5, 0.9, 0.99)], w=16, unit="ms")
    b.panel("stat", "Wasm VMs", "Wasm VMs running in the proxy (each filter has one per worker thread, plus the main thread's).",
            [("sum(envoy_wasm_envoy_wasm_runtime_v8_active)", "VMs")], w=4)

    b.row("Authentication (tollgate.auth)")
    b.panel("timeseries", "Allowed, by method", "Authenticated requests by how (JWT, API key, introspection), and anonymous ones on optional routes.",
            [(family_rate("tollgate_auth_allowed_.+", "method", "tollgate_auth_allowed_(.+)"), "{{method}}"),
             (rate("tollgate_auth_anonymous"), "anonymous")], unit="reqps")
    b.panel("timeseries", "Refused, by reason", "401, 403 and 503 answers by reason (docs/filters/auth.md).",
            [(family_rate("tollgate_auth_denied_.+", "reason", "tollgate_auth_denied_(.+)"), "{{reason}}")], unit="reqps")
    b.panel("timeseries", "Key fetches", "JWKS fetches that succeeded and failed, and refetches caused by unknown key ids.",
            [(f"sum(increase(tollgate_auth_jwks_fetches[{RATE}]))", "fetched"),
             (f"sum(increase(tollgate_auth_jwks_fetch_failures[{RATE}]))", "failed"),
             (f"sum(increase(tollgate_auth_jwks_refetches[{RATE}]))", "refetch (unknown kid)")])

    b.row("Rate limiting (tollgate.ratelimit)")
    b.panel("timeseries", "Refusals per limit", "Requests each limit refused (429), and what shadow limits would have refused "
            "(an admitted request counts once, in the total allowed: no limit has an allowed counter of its own).",
            [(family_rate("tollgate_ratelimit_limit_.+_limited", "limit", "tollgate_ratelimit_limit_(.+)_limited",
                          exclude=".+_shadow_limited"), "{{limit}} limited"),
             (family_rate("tollgate_ratelimit_limit_.+_shadow_limited", "limit", "tollgate_ratelimit_limit_(.+)_shadow_limited"),
              "{{limit}} shadow")], w=12, unit="reqps")
    b.panel("timeseries", "Admitted and refused", "All limits together (every request counts once: admitted, refused or skipped); failures are counter updates that failed (failure_mode applied).",
            [(rate("tollgate_ratelimit_allowed"), "admitted"), (rate("tollgate_ratelimit_limited"), "refused (429)"),
             (rate("tollgate_ratelimit_skipped"), "skipped (no limit applied)"),
             (rate("tollgate_ratelimit_shadow_limited"), "shadow refusals"), (rate("tollgate_ratelimit_failures"), "failures")],
            w=12, unit="reqps")

    b.row("Cache (tollgate.cache)")
    b.panel("stat", "Hit ratio", "Answers from the cache among lookups (hits / (hits + misses)).",
            [(f"{rate('tollgate_cache_hits')} / ({rate('tollgate_cache_hits')} + {rate('tollgate_cache_misses')})", "hit ratio")],
            w=4, unit="percentunit")
    b.panel("timeseries", "Cache-Status outcomes", "What the RFC 9211 Cache-Status header said: hit, hit while stale (stale-while-revalidate, stale-if-error), forwarded to revalidate a stale entry (fwd=stale), forwarded on a miss (fwd=uri-miss/vary-miss), collapsed into another request's fetch; and entries stored and invalidated.",
            [(rate("tollgate_cache_hits"), "hit"), (rate("tollgate_cache_stale_served"), "hit (stale)"),
             (rate("tollgate_cache_revalidations"), "fwd=stale"), (rate("tollgate_cache_misses"), "fwd=miss"),
             (rate("tollgate_cache_collapsed"), "collapsed"), (rate("tollgate_cache_stores"), "stored"),
             (rate("tollgate_cache_invalidations"), "invalidated")], w=14, unit="reqps")
    b.panel("stat", "Entries and bytes", "Entries held in shared data and the bytes of their slots.",
            [("max(tollgate_cache_entries)", "entries"), ("max(tollgate_cache_bytes)", "bytes")], w=6)

    b.row("Aggregation (tollgate.aggregate)")
    b.panel("timeseries", "Answers per endpoint", "Composite answers: complete, partial (an optional call failed: x-aggregate-complete: false) and failed (a required call failed: 502/504).",
            [(family_rate(f"tollgate_aggregate_ep_.+_{o}", "endpoint", f"tollgate_aggregate_ep_(.+)_{o}"), f"{{{{endpoint}}}} {o}")
             for o in ("complete", "partial", "failed")], unit="reqps")
    b.panel("timeseries", "Circuit breakers", "Breaker state changes per backend cluster: opened, half-open probes let through, closed again.",
            [(family_rate("tollgate_aggregate_breaker_.+_opened", "cluster", "tollgate_aggregate_breaker_(.+)_opened",
                          exclude=".+_half_opened"), "{{cluster}} opened"),
             (family_rate("tollgate_aggregate_breaker_.+_half_opened", "cluster", "tollgate_aggregate_breaker_(.+)_half_opened"),
              "{{cluster}} half-open"),
             (family_rate("tollgate_aggregate_breaker_.+_closed", "cluster", "tollgate_aggregate_breaker_(.+)_closed"),
              "{{cluster}} closed")])
    b.panel("timeseries", "Endpoint latency (p99)", "Time from the request headers to the composite answer.",
            [("histogram_quantile(0.99, sum by (endpoint, le) (rate("
              + family("tollgate_aggregate_ep_.+_latency_ms_bucket", "endpoint", "tollgate_aggregate_ep_(.+)_latency_ms_bucket")
              + f"[{RATE}:])))", "{{endpoint}}")], unit="ms")
    b.panel("timeseries", "Backend calls", "Calls per backend cluster, and those that failed, timed out or were refused by an open breaker.",
            [(family_rate(f"tollgate_aggregate_backend_.+_{k}", "cluster", f"tollgate_aggregate_backend_(.+)_{k}"), f"{{{{cluster}}}} {k}")
             for k in ("calls", "failures", "timeouts", "rejected")], w=24)

    return {
        "title": "Tollgate",
        "uid": "tollgate",
        "description": "Tollgate's Envoy Wasm filters: authentication, rate limiting, cache, aggregation. Generated by scripts/gen-dashboard.py.",
        "tags": ["tollgate", "envoy"],
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-15m", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "refresh": 1},
            {"name": "gateway", "label": "Gateway connection manager (label matcher)", "type": "textbox",
             "query": 'envoy_http_conn_manager_prefix="gateway"',
             "current": {"text": 'envoy_http_conn_manager_prefix="gateway"', "value": 'envoy_http_conn_manager_prefix="gateway"'},
             "hide": 0},
        ]},
        "panels": b.done(),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="only report whether the file is up to date")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    text = render()
    current = args.out.read_text() if args.out.exists() else None
    if args.check:
        if current != text:
            print(f"gen-dashboard: {args.out} is out of date (run `make manifests`)", file=sys.stderr)
            return 1
        return 0
    if current != text:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"gen-dashboard: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
