#!/usr/bin/env python3
"""Release artifacts: `make release` (or `make dist`) replaces dist/ (or --out DIR) with:

    tollgate-<filter>-<version>.wasm      the four modules, named with the version
    schemas/<name>.schema.json            the JSON Schemas of the filter configurations
    oci/tollgate-<filter>/                one OCI image layout per module (scripts/oci.py): the
                                          filter's docs and schema layers, then plugin.wasm
    oci/digests.json                      image references, manifest digests and module digests
    deploy/                               the Istio, Envoy Gateway, plain-Envoy and Kubernetes files
                                          (scripts/gen-deploy.py) for the registry the images go to
                                          (TOLLGATE_REGISTRY, default ghcr.io/tollgate-gw)
    grafana/                              the Grafana dashboard and the Istio stats patch (deploy/grafana/)
    SHA256SUMS                            every other file above, OCI layouts included:
                                          `cd dist && sha256sum -c SHA256SUMS`

The modules come from build/ (`make build`); nothing is rebuilt here. The output folder is replaced
as a whole (no stale files from an earlier release), but only when it looks like one of ours: it
does not exist, is empty, or holds a SHA256SUMS.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import oci  # noqa: E402  (scripts/oci.py)

ROOT = oci.ROOT
GRAFANA = ROOT / "deploy" / "grafana"


def gen_deploy():
    spec = importlib.util.spec_from_file_location("gen_deploy", ROOT / "scripts" / "gen-deploy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_release(out: Path, build: Path, version: str) -> None:
    for f in oci.FILTERS:
        src = oci.module_path(build, f)
        if not src.exists():
            raise SystemExit(f"dist: {src} is missing: run `make build` first")
        shutil.copyfile(src, out / f"tollgate-{f}-{version}.wasm")
    (out / "schemas").mkdir()
    for path in sorted((ROOT / "schemas").glob("*.schema.json")):
        shutil.copyfile(path, out / "schemas" / path.name)
    oci.main(["--out", str(out / "oci"), "--build", str(build), "--version", version])
    gen = gen_deploy()
    for rel, text in gen.generate(version, build).items():
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    if GRAFANA.is_dir():
        shutil.copytree(GRAFANA, out / "grafana")
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    (out / "SHA256SUMS").write_text("".join(f"{sha256_file(out / name)}  {name}\n" for name in files))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "dist", help="output folder (default: dist/)")
    p.add_argument("--build", type=Path, default=ROOT / "build", help="where the modules are (default: build/)")
    p.add_argument("--version", default=None, help="release version (default: the Cargo workspace version)")
    args = p.parse_args(argv)
    version = args.version or oci.workspace_version()
    out: Path = args.out.resolve()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "SHA256SUMS").exists())):
        print(f"dist: refusing to replace {out}: not empty and not a release folder (no SHA256SUMS)", file=sys.stderr)
        return 1
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        write_release(staging, args.build, version)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    print(f"dist: {out} (version {version}, images for {oci.REGISTRY})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
