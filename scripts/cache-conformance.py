#!/usr/bin/env python3
"""Run the public HTTP cache test suite (http-tests/cache-tests, the suite behind
https://cache-tests.fyi) against Tollgate's cache filter in a real Envoy.

    .venv/bin/python scripts/cache-conformance.py        (or: make cache-conformance)
    .venv/bin/python scripts/cache-conformance.py TEST-ID   (one test, with what the client saw)
    .venv/bin/python scripts/cache-conformance.py --summarise   (rewrite the .md from the .json)

The suite is not part of this repository: it is cloned (pinned commit, `CACHE_TESTS_COMMIT`) into
.cache-tests/ (gitignored), or taken from CACHE_TESTS_DIR. It needs Node.js >= 14.8 (and npm for
its `undici` dependency). The script starts the suite's origin server on a free port, an Envoy with
build/tollgate_cache.wasm (TOLLGATE_MODULE=combined: the combined module) in front of it, runs the
suite's command-line client against Envoy and writes
  bench/results/cache-conformance.json  (the client's results, the format of the suite's results/)
  bench/results/cache-conformance.md    (the summary: ours against the published ATS and httpd
                                         results on the same tests, every required failure)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import harness  # noqa: E402

SUITE_URL = "https://github.com/http-tests/cache-tests.git"
CACHE_TESTS_COMMIT = "b55b8bda3dbb8c927c04e85bd8d496a8caa3e4ba"
RESULTS = ROOT / "bench" / "results"

# Why each required failure fails, by test id (filled in from the analysis of each failure; a
# failure not listed here is reported as "not analysed").
_AGE = ("ours: an invalid `Age` makes the response stale (the reading of issue #14.3); RFC 9111 5.1 says a "
        "cache SHOULD ignore the field. Not Envoy's codec: a one-line fix in `freshness.rs` (pending: it "
        "reverses a case of tests/test_cache.py)")
REASONS: dict[str, str] = {
    "age-parse-float": _AGE,
    "age-parse-negative": _AGE,
    "age-parse-nonnumeric": _AGE,
}

# The configuration under test: every request goes through one rule that caches everything the RFC
# allows (no rule-level stale_if_error, no refresh: only the response's own directives count).
# 512 sets x 8 ways: room for every test's URLs (the client runs many tests at once; with a few
# sets, entries of one test evict another's and its "Response 2 does not come from cache").
CACHE_CONFIG = {
    "routes": [{}],
    "max_total_bytes": 32 * 1024 * 1024,
    "max_entry_bytes": 8 * 1024,
    "ways": 8,
}


def suite_dir() -> Path:
    given = os.environ.get("CACHE_TESTS_DIR")
    if given:
        return Path(given)
    d = ROOT / ".cache-tests"
    if not (d / "package.json").exists():
        subprocess.run(["git", "clone", "-q", SUITE_URL, str(d)], check=True)
        subprocess.run(["git", "-C", str(d), "checkout", "-q", CACHE_TESTS_COMMIT], check=True)
    return d


def ensure_node_deps(d: Path) -> None:
    if not (d / "node_modules" / "undici").exists():
        subprocess.run(["npm", "install", "--no-save", "--no-audit", "--no-fund", "undici@7"], cwd=d, check=True,
                       stdout=subprocess.DEVNULL)


def start_origin(d: Path, port: int) -> subprocess.Popen:
    env = dict(os.environ, npm_package_config_protocol="http", npm_package_config_port=str(port),
               npm_package_config_pidfile=str(Path(tempfile.gettempdir()) / f"cache-tests-{port}.pid"))
    log = open(Path(tempfile.gettempdir()) / f"cache-tests-origin-{port}.log", "wb")
    proc = subprocess.Popen(["node", "test-engine/server/server.mjs"], cwd=d, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    harness.wait_for(lambda: harness._port_open(port), 30, "the cache-tests origin server")
    return proc


def start_envoy(origin_port: int) -> harness.Envoy:
    routes = [{"match": {"prefix": "/"}, "route": {"cluster": "origin", "timeout": "60s"}}]
    config = harness.bootstrap(harness.free_port(), harness.free_port(),
                               harness.chain_entries([("cache", CACHE_CONFIG)]),
                               [harness.static_cluster("origin", origin_port, timeout="5s")], routes)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    # Forward the origin's 1xx interim responses (103 Early Hints) instead of dropping them.
    hcm["proxy_100_continue"] = True
    return harness.Envoy.start(config=config, concurrency=2)


def run_client(d: Path, base: str) -> dict:
    # What `npm run cli --base=...` sets (the client reads npm's variables).
    env = dict(os.environ, npm_config_base=base, npm_config_id="", npm_package_config_id="")
    out = subprocess.run(["node", "--no-warnings", "test-engine/cli.mjs"], cwd=d, env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"the cache-tests client failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout)


SUMMARISE = r"""
import tests from '%(suite)s/tests/index.mjs'
import { determineTestResult, resultTypes } from '%(suite)s/test-engine/lib/results.mjs'
import fs from 'fs'
const files = JSON.parse(process.argv[1])
const ours = JSON.parse(fs.readFileSync(files.ours, 'utf8'))
const ids = Object.keys(ours)
const names = Object.fromEntries(Object.entries(resultTypes).map(([k, v]) => [v[2], k]))
const out = {}
for (const [name, file] of Object.entries(files)) {
  const res = JSON.parse(fs.readFileSync(file, 'utf8'))
  const counts = {}
  const requiredFailures = []
  for (const id of ids) {
    let kind
    try { kind = names[determineTestResult(tests, id, res)[2]] } catch (e) { kind = 'untested' }
    counts[kind] = (counts[kind] || 0) + 1
    if (kind === 'fail') requiredFailures.push(id)
  }
  out[name] = { counts, requiredFailures }
}
const info = {}
for (const s of tests) for (const t of s.tests) info[t.id] = { suite: s.name, name: t.name, kind: t.kind || 'required', spec: t.spec_anchors || [] }
out.info = info
console.log(JSON.stringify(out))
"""


def summarise(d: Path, ours: Path) -> dict:
    files = {"ours": str(ours), "ATS": str(d / "results" / "trafficserver.json"),
             "httpd": str(d / "results" / "apache.json")}
    script = SUMMARISE % {"suite": d.resolve().as_uri()}
    out = subprocess.run(["node", "--no-warnings", "--input-type=module", "-e", script, json.dumps(files)],
                         cwd=d, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def envoy_version() -> str:
    out = subprocess.run([harness.envoy_binary(), "--version"], capture_output=True, text=True)
    words = out.stdout.split()
    return next((w for w in words if w.count("/") >= 2), out.stdout.strip())


def write_markdown(s: dict, d: Path) -> str:
    order = ["pass", "fail", "optional_fail", "yes", "no", "setup_fail", "harness_fail", "dependency_fail", "retry",
             "untested"]
    label = {"pass": "pass", "fail": "**required failures**", "optional_fail": "optimal not met (⚠️)",
             "yes": "check: yes", "no": "check: no", "setup_fail": "setup failure", "harness_fail": "harness failure",
             "dependency_fail": "dependency failed", "retry": "retried (manual)", "untested": "not tested"}
    commit = subprocess.run(["git", "-C", str(d), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    total = sum(s["ours"]["counts"].values())
    lines = [
        "# HTTP cache conformance: http-tests/cache-tests",
        "",
        "Generated by `make cache-conformance` (`scripts/cache-conformance.py`): the public suite behind",
        "[cache-tests.fyi](https://cache-tests.fyi) ([http-tests/cache-tests](https://github.com/http-tests/cache-tests)",
        f"at `{commit or CACHE_TESTS_COMMIT}`) run with its command-line client against Envoy",
        f"(`{envoy_version()}`, 2 workers) with `tollgate.cache` ({'combined module' if harness.COMBINED else 'single module'})",
        "in front of the suite's origin server, one rule caching every route:",
        "",
        "```json",
        json.dumps(CACHE_CONFIG),
        "```",
        "",
        "ATS (Apache Traffic Server) and httpd (Apache httpd) are the suite's published results",
        "(`results/trafficserver.json`, `results/apache.json` of the same commit), classified the same",
        f"way over the same {total} tests (those the command-line client runs). Raw results:",
        "[cache-conformance.json](cache-conformance.json).",
        "",
        "| result | Tollgate | ATS | httpd |",
        "|---|---:|---:|---:|",
    ]
    for k in order:
        vals = [s[n]["counts"].get(k, 0) for n in ("ours", "ATS", "httpd")]
        if any(vals):
            lines.append(f"| {label[k]} | {vals[0]} | {vals[1]} | {vals[2]} |")
    lines += ["", "A required failure is a test of kind `required` (a MUST of RFC 9111/9110) whose result is ⛔️;",
              "a test whose dependency failed is counted apart (⚪️), as on cache-tests.fyi.", "",
              "## Tollgate's required failures", ""]
    fails = s["ours"]["requiredFailures"]
    if not fails:
        lines.append("None.")
    else:
        lines += ["| test | what it checks | why |", "|---|---|---|"]
        for tid in fails:
            info = s["info"].get(tid, {})
            lines.append(f"| `{tid}` | {info.get('name', '')} | {REASONS.get(tid, 'not analysed')} |")
    for n in ("ATS", "httpd"):
        lines += ["", f"<details><summary>{n}'s required failures ({len(s[n]['requiredFailures'])})</summary>", ""]
        lines += [f"* `{t}`" for t in s[n]["requiredFailures"]]
        lines += ["", "</details>"]
    return "\n".join(lines) + "\n"


def debug_one(d: Path, test_id: str) -> int:
    """`scripts/cache-conformance.py TEST-ID`: run one test, print what the client saw."""
    origin_port = harness.free_port()
    origin = start_origin(d, origin_port)
    envoy = None
    try:
        envoy = start_envoy(origin_port)
        env = dict(os.environ, npm_config_base=f"http://127.0.0.1:{envoy.port}", npm_config_id=test_id,
                   npm_package_config_id=test_id)
        return subprocess.run(["node", "--no-warnings", "test-engine/cli.mjs"], cwd=d, env=env).returncode
    finally:
        if envoy is not None:
            envoy.stop()
        origin.terminate()
        origin.wait(10)


def main() -> int:
    d = suite_dir()
    if sys.argv[1:] == ["--summarise"]:
        # Rewrite the summary from the last raw results (no run).
        s = summarise(d, RESULTS / "cache-conformance.json")
        (RESULTS / "cache-conformance.md").write_text(write_markdown(s, d))
        return 0
    if len(sys.argv) > 1:
        ensure_node_deps(d)
        return debug_one(d, sys.argv[1])
    ensure_node_deps(d)
    origin_port = harness.free_port()
    origin = start_origin(d, origin_port)
    envoy = None
    try:
        envoy = start_envoy(origin_port)
        results = run_client(d, f"http://127.0.0.1:{envoy.port}")
    finally:
        if envoy is not None:
            envoy.stop()
        origin.terminate()
        origin.wait(10)
    RESULTS.mkdir(parents=True, exist_ok=True)
    raw = RESULTS / "cache-conformance.json"
    raw.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    s = summarise(d, raw)
    (RESULTS / "cache-conformance.md").write_text(write_markdown(s, d))
    c = {n: s[n]["counts"] for n in ("ours", "ATS", "httpd")}
    print(f"Tollgate: {c['ours'].get('pass', 0)} pass, {c['ours'].get('fail', 0)} required failures; "
          f"ATS {c['ATS'].get('fail', 0)}, httpd {c['httpd'].get('fail', 0)} required failures "
          f"-> {RESULTS / 'cache-conformance.md'}")
    for tid in s["ours"]["requiredFailures"]:
        print("  required failure:", tid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
