#!/usr/bin/env python3
"""Make an instr.sh run directory for the dynamic-module spike (docs/dynamic-modules.md).

usage: make_variants.py BENCH_RUN_DIR OUT_DIR

BENCH_RUN_DIR is what `bench.py --quick --keep --only baseline --only ratelimit-never` printed
("Envoy configs and logs: ..."). OUT_DIR gets `upstream/`, the bench variants under short names
and one `dm_*` variant per filter_config below: the ratelimit-never probe gateway with the probe
replaced by the dynamic module. Envoy finds libtollgate_dynmod.so through
ENVOY_DYNAMIC_MODULES_SEARCH_PATH (export it before running instr.sh).
"""
import copy
import json
import shutil
import sys
from pathlib import Path

VARIANTS = {
    "dm_noop": "noop",
    "dm_work": "path,clock,bucket,counter,headers",
    "dm_path": "path",
    "dm_headers": "headers",
    "dm_counter": "counter",
    "dm_clock_bucket": "clock,bucket",
}
COPIED = {
    "upstream": "upstream",
    "baseline_no_filter": "no_filter",
    "ratelimit-never_probe_(wasm_floor)": "probe_floor",
    "ratelimit-never_tollgate_ratelimit": "tollgate_ratelimit",
    "ratelimit-never_native_local_ratelimit": "native_local_ratelimit",
}


def main() -> None:
    run, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    for src, dst in COPIED.items():
        shutil.copytree(run / src, out / dst, dirs_exist_ok=True)
    base = json.loads((run / "ratelimit-never_probe_(wasm_floor)" / "envoy.json").read_text())
    for name, ops in VARIANTS.items():
        cfg = copy.deepcopy(base)
        hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["http_filters"][0] = {
            "name": "tollgate.dynmod",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter",
                "dynamic_module_config": {"name": "tollgate_dynmod", "metrics_namespace": "tollgate_dynmod"},
                "filter_name": "ratelimit",
                "filter_config": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": ops},
            },
        }
        (out / name).mkdir(exist_ok=True)
        (out / name / "envoy.json").write_text(json.dumps(cfg, indent=1))


if __name__ == "__main__":
    main()
