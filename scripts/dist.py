#!/usr/bin/env python3
"""Release artifacts: `make dist` writes into dist/ (or --out DIR):

    tollgate-<filter>-<version>.wasm      the four modules, named with the version
    tollgate-<version>.wasm               the combined module (the four filters in one module)
    SHA256SUMS                            `sha256sum -c SHA256SUMS` checks every file listed
    schemas/<name>.schema.json            the JSON Schemas of the filter configurations
    oci/tollgate-<filter>/, oci/tollgate/ one OCI image layout per module (scripts/oci.py)
    oci/digests.json                      image references and manifest digests

The modules come from build/ (`make build`); nothing is rebuilt here.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import oci  # noqa: E402  (scripts/oci.py)

ROOT = oci.ROOT


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "dist", help="output folder (default: dist/)")
    p.add_argument("--build", type=Path, default=ROOT / "build", help="where the modules are (default: build/)")
    p.add_argument("--version", default=None, help="release version (default: the Cargo workspace version)")
    args = p.parse_args(argv)
    version = args.version or oci.workspace_version()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    sums = []
    for f in oci.MODULES:
        src = oci.module_path(args.build, f)
        if not src.exists():
            print(f"dist: {src} is missing: run `make build` first", file=sys.stderr)
            return 1
        name = f"{oci.image_name(f)}-{version}.wasm"
        shutil.copyfile(src, out / name)
        sums.append((hashlib.sha256((out / name).read_bytes()).hexdigest(), name))
    schemas = out / "schemas"
    if schemas.exists():
        shutil.rmtree(schemas)
    schemas.mkdir()
    for path in sorted((ROOT / "schemas").glob("*.schema.json")):
        shutil.copyfile(path, schemas / path.name)
        sums.append((hashlib.sha256(path.read_bytes()).hexdigest(), f"schemas/{path.name}"))
    oci.main(["--out", str(out / "oci"), "--build", str(args.build), "--version", version])
    (out / "SHA256SUMS").write_text("".join(f"{digest}  {name}\n" for digest, name in sums))
    print(f"dist: {out} (version {version})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
