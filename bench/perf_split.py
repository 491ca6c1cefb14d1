#!/usr/bin/env python3
"""Where a gateway's CPU goes, per variant, with `perf` (software clock; no hardware counters here):
the share of samples in the kernel, the Envoy binary (Envoy itself, V8's runtime and the proxy-wasm
host functions: the binary is stripped, so they cannot be told apart), V8's JIT code (the wasm
filters' own compiled code) and libc. Run under the same saturating load as the benchmark.

    .venv/bin/python bench/perf_split.py "baseline/no filter" "cache-hit/tollgate cache" ...

Writes bench/results/perf-split.md (appends one row per variant given).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as B  # noqa: E402


class Args:
    scenarios = None
    no_memory = True
    memory_keys = None
    memory_seconds = None


def split(data: Path) -> dict[str, float]:
    out = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--sort", "dso", "-g", "none",
                          "--stdio"], capture_output=True, text=True).stdout
    shares: dict[str, float] = {}
    for line in out.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(.+?)\s*$", line)
        if not m:
            continue
        pct, dso = float(m.group(1)), m.group(2)
        key = ("JIT (wasm code)" if dso.startswith("[JIT]") else "kernel" if "kernel" in dso
               else "envoy binary" if dso == "envoy" else "libc" if dso.startswith("libc") else "other")
        shares[key] = shares.get(key, 0.0) + pct
    return shares


def main() -> int:
    keys = sys.argv[1:]
    if not keys:
        print(__doc__)
        return 2
    B.ensure_loadgen()
    scenarios, _ = B.discover(None)
    variants = {v.key: v for sc in scenarios for v in sc.variants}
    chosen = [variants[k] for k in keys if k in variants]
    for k in keys:
        if k not in variants:
            print(f"no variant {k!r}; see bench/bench.py --list", file=sys.stderr)
    bench = B.Bench(B.PROFILES["full"], scenarios, [], Args())
    rows = []
    try:
        bench.start_upstreams()
        bench.start_gateways(chosen)
        for v in chosen:
            if not v.gateway:
                rows.append(f"| {v.key} | {v.skip} | | | | | | |")
                continue
            g = v.gateway
            B.loadgen(g.port, v.load, bench.cores, duration=1, conns=16)
            with tempfile.TemporaryDirectory() as d:
                data = Path(d) / "perf.data"
                perf = subprocess.Popen(["perf", "record", "-F", "2000", "-o", str(data), "-p", str(g.pid)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(0.3)
                c0 = g.cpu_ns()
                r = B.loadgen(g.port, v.load, bench.cores, duration=5, conns=16)
                us = (g.cpu_ns() - c0) / 1000 / max(1, r["ops"])
                perf.send_signal(2)
                perf.wait()
                s = split(data)
            def part(k):
                return f"{s.get(k, 0):.1f} % ({s.get(k, 0) * us / 100:.1f})"
            rows.append(f"| {v.key} | {r['ops_per_s']:.0f} | {us:.1f} | {part('kernel')} | {part('envoy binary')} "
                        f"| {part('JIT (wasm code)')} | {part('libc')} | {part('other')} |")
            print(rows[-1])
    finally:
        bench.stop_all()
    out = B.RESULTS / "perf-split.md"
    if not out.exists():
        out.write_text("# Where the gateway's CPU goes (perf, software clock, saturating load)\n\n"
                       "Produced by `bench/perf_split.py`. \"envoy binary\" is Envoy, V8's runtime and the "
                       "proxy-wasm host functions together (the binary is stripped); \"JIT\" is the wasm "
                       "filters' own compiled code. Each cell: share of the samples (and µs per operation, "
                       "from the gateway's schedstat CPU time during the same run).\n\n"
                       "| variant | op/s | CPU µs/op | kernel | envoy binary | JIT (wasm code) | libc | other |\n"
                       "|---|---|---|---|---|---|---|---|\n")
    with out.open("a") as f:
        f.write("\n".join(rows) + "\n")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
