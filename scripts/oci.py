#!/usr/bin/env python3
"""Package Tollgate .wasm modules as OCI images, written as OCI image layouts, without Docker.

    scripts/oci.py                                  # build/tollgate_<f>.wasm -> dist/oci/tollgate-<f>/
    scripts/oci.py --out /tmp/oci --version 1.2.3 auth ratelimit

Format: the Wasm image *compat* variant (github.com/solo-io/wasm, spec-compat.md), which both
Istio's and Envoy Gateway's image fetchers pull, with the filter's documentation in front of it the
way Higress ships its plugins:

- layer 1: the filter's documentation (docs/filters/<filter>.md), one raw file, media type
  `application/vnd.module.wasm.doc.v1+markdown` (Higress's README layer);
- layer 2: the JSON Schema of its configuration (schemas/<filter>.schema.json with the schemas it
  refers to embedded under `$defs`), one raw file, `application/schema+json`;
- the last layer: `application/vnd.oci.image.layer.v1.tar+gzip`, a tar holding one file,
  `plugin.wasm` (the module, byte for byte). Istio and Envoy Gateway read only the last layer of a
  compat image (pkg/wasm/imagefetcher.go: `layers[len(layers)-1]`), so the other layers are free;
- the manifest annotation `module.wasm.image/variant: compat`; each layer is annotated with its
  file name (`org.opencontainers.image.title`), so `oras pull` writes README.md, the schema and
  plugin.tar.gz;
- an OCI image config (`application/vnd.oci.image.config.v1+json`) whose `rootfs.diff_ids` lists
  each layer's uncompressed digest, so that registries and `crane`/`oras` accept it as an image.

The *oci* variant (a raw layer `application/vnd.module.wasm.content.layer.v1+wasm`) is refused
by both fetchers unless the image has exactly two layers (the module and a runtime config).

Everything is deterministic (fixed tar metadata, no timestamps in the config, and a gzip stream of
*stored* deflate blocks written here rather than by zlib, whose compressed bytes differ between
zlib and zlib-ng), so the manifest digest, which Istio's `sha256` and Envoy Gateway's
`image.sha256` check, depends only on the module bytes, the two documents and the version: `make
oci` on another machine gives the digests in deploy/ when the modules are the same (the pinned
toolchain, rust-toolchain.toml). Each layout's index.json tags the manifest with the version
(`org.opencontainers.image.ref.name`), ready for:

    crane push dist/oci/tollgate-auth ghcr.io/tollgate-gw/tollgate-auth:0.1.0
    oras cp --from-oci-layout dist/oci/tollgate-auth:0.1.0 ghcr.io/tollgate-gw/tollgate-auth:0.1.0
    skopeo copy oci:dist/oci/tollgate-auth:0.1.0 docker://ghcr.io/tollgate-gw/tollgate-auth:0.1.0
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import struct
import sys
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILTERS = ("auth", "ratelimit", "cache", "aggregate")

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
# The documentation layers in front of the module (Higress's media type for the README).
MEDIA_DOC = "application/vnd.module.wasm.doc.v1+markdown"
MEDIA_SCHEMA = "application/schema+json"
TITLE_ANNOTATION = "org.opencontainers.image.title"
VARIANT_ANNOTATION = "module.wasm.image/variant"
PLUGIN_FILE = "plugin.wasm"
# Where the images are published; TOLLGATE_REGISTRY=my.registry.example/team overrides it.
DEFAULT_REGISTRY = "ghcr.io/tollgate-gw"
REGISTRY = (os.environ.get("TOLLGATE_REGISTRY") or DEFAULT_REGISTRY).rstrip("/")
SOURCE = "https://github.com/tollgate-gw/tollgate"


def workspace_version() -> str:
    """`[workspace.package] version` from Cargo.toml."""
    text = (ROOT / "Cargo.toml").read_text()
    section = re.search(r"^\[workspace\.package\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    found = section and re.search(r'^version\s*=\s*"([^"]+)"', section.group(1), re.M)
    if not found:
        raise SystemExit("oci: no [workspace.package] version in Cargo.toml")
    return found.group(1)


def image_name(filter_name: str) -> str:
    return f"tollgate-{filter_name}"


def image_ref(filter_name: str, version: str) -> str:
    return f"{REGISTRY}/{image_name(filter_name)}:{version}"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def layer_tar(module: bytes) -> bytes:
    """An uncompressed tar with one regular file, plugin.wasm, and fixed metadata."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo(PLUGIN_FILE)
        info.size = len(module)
        info.mode = 0o444
        info.mtime = 0
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        tar.addfile(info, io.BytesIO(module))
    return buf.getvalue()


def gzip_fixed(data: bytes) -> bytes:
    """A gzip stream (RFC 1952: mtime 0, no name, OS unknown) of stored deflate blocks (RFC 1951,
    BTYPE 00, at most 65535 bytes each): the same input gives the same bytes on every machine,
    which compressed output does not promise (zlib and zlib-ng compress differently)."""
    out = bytearray(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")
    chunks = [data[i:i + 0xFFFF] for i in range(0, len(data), 0xFFFF)] or [b""]
    for n, chunk in enumerate(chunks):
        final = 1 if n == len(chunks) - 1 else 0
        out += bytes([final]) + struct.pack("<HH", len(chunk), len(chunk) ^ 0xFFFF) + chunk
    out += struct.pack("<II", zlib.crc32(data) & 0xFFFFFFFF, len(data) & 0xFFFFFFFF)
    return bytes(out)


@dataclass
class Document:
    """A file carried in its own raw layer in front of the module."""

    filename: str
    media_type: str
    data: bytes


@dataclass
class Image:
    """One module as an OCI image: every blob (digest hex -> bytes) and the manifest descriptor."""

    name: str
    version: str
    module_sha256: str
    blobs: dict[str, bytes]
    manifest: dict
    manifest_bytes: bytes

    @property
    def digest(self) -> str:
        """The manifest digest (hex): Istio's `sha256`, Envoy Gateway's `image.sha256`."""
        return sha256(self.manifest_bytes)

    def descriptor(self) -> dict:
        return {
            "mediaType": MEDIA_MANIFEST,
            "digest": f"sha256:{self.digest}",
            "size": len(self.manifest_bytes),
            "annotations": {"org.opencontainers.image.ref.name": self.version},
        }


def build_image(module: bytes, name: str, version: str, documents: list[Document] | tuple = ()) -> Image:
    """The image of one module; `documents` become raw layers in front of the module's layer."""
    if module[:4] != b"\0asm":
        raise ValueError(f"{name}: not a WebAssembly module (no \\0asm magic)")
    tar = layer_tar(module)
    layer = gzip_fixed(tar)
    layers = [{"mediaType": d.media_type, "digest": f"sha256:{sha256(d.data)}", "size": len(d.data),
               "annotations": {TITLE_ANNOTATION: d.filename}} for d in documents]
    layers.append({"mediaType": MEDIA_LAYER, "digest": f"sha256:{sha256(layer)}", "size": len(layer),
                   "annotations": {TITLE_ANNOTATION: "plugin.tar.gz"}})
    config = canonical_json({
        "architecture": "wasm",
        "os": "wasip1",
        "config": {"Labels": {"org.opencontainers.image.title": name,
                              "org.opencontainers.image.version": version}},
        # A raw layer is its own uncompressed form.
        "rootfs": {"type": "layers",
                   "diff_ids": [f"sha256:{sha256(d.data)}" for d in documents] + [f"sha256:{sha256(tar)}"]},
    })
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": f"sha256:{sha256(config)}", "size": len(config)},
        "layers": layers,
        "annotations": {
            VARIANT_ANNOTATION: "compat",
            "org.opencontainers.image.title": name,
            "org.opencontainers.image.version": version,
            "org.opencontainers.image.source": SOURCE,
            "org.opencontainers.image.licenses": "Apache-2.0",
            "org.opencontainers.image.description": f"Tollgate {name} proxy-wasm HTTP filter for Envoy "
                                                   f"(module sha256 {sha256(module)})",
        },
    }
    manifest_bytes = json.dumps(manifest, indent=2, sort_keys=True).encode()
    blobs = {sha256(b): b for b in (config, *(d.data for d in documents), layer, manifest_bytes)}
    return Image(name, version, sha256(module), blobs, manifest, manifest_bytes)


def write_layout(image: Image, directory: Path) -> Path:
    """Write `image` as an OCI image layout in `directory` (replaced if it exists)."""
    if directory.exists():
        shutil.rmtree(directory)
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    for digest, data in image.blobs.items():
        (blobs / digest).write_bytes(data)
    (directory / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}) + "\n")
    index = {"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": [image.descriptor()]}
    (directory / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    return directory


def module_path(build: Path, filter_name: str) -> Path:
    return build / f"tollgate_{filter_name}.wasm"


def bundled_schema(path: Path) -> bytes:
    """A configuration schema with the schemas it refers to (by relative `$ref`, resolved against
    its `$id`; and theirs, in turn) embedded under `$defs`, so that the one file validates on its own."""
    schema = json.loads(path.read_text())

    def refs_of(v, found: list[str]):
        if isinstance(v, dict):
            ref = v.get("$ref")
            if isinstance(ref, str) and not ref.startswith("#") and "://" not in ref:
                name = ref.split("#", 1)[0]
                if name not in found:
                    found.append(name)
            for x in v.values():
                refs_of(x, found)
        elif isinstance(v, list):
            for x in v:
                refs_of(x, found)
        return found

    embedded: dict[str, dict] = {}
    todo = refs_of(schema, [])
    while todo:
        name = todo.pop(0)
        if name in embedded or name == path.name:
            continue
        embedded[name] = json.loads((path.parent / name).read_text())
        todo += [n for n in refs_of(embedded[name], []) if n not in embedded]
    if embedded:
        schema["$defs"] = {**schema.get("$defs", {}), **dict(sorted(embedded.items()))}
    return (json.dumps(schema, indent=2, sort_keys=True) + "\n").encode()


def documents_for(filter_name: str) -> list[Document]:
    """The documentation layers of a filter's image: its docs page and its configuration schema
    (each only when it exists)."""
    out = []
    doc = ROOT / "docs" / "filters" / f"{filter_name}.md"
    if doc.exists():
        out.append(Document("README.md", MEDIA_DOC, doc.read_bytes()))
    schema = ROOT / "schemas" / f"{filter_name}.schema.json"
    if schema.exists():
        out.append(Document(schema.name, MEDIA_SCHEMA, bundled_schema(schema)))
    return out


def image_for(filter_name: str, version: str, build: Path = ROOT / "build") -> Image:
    path = module_path(build, filter_name)
    if not path.exists():
        raise SystemExit(f"oci: {path} is missing: run `make build` first")
    return build_image(path.read_bytes(), image_name(filter_name), version, documents_for(filter_name))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("filters", nargs="*", metavar="FILTER", help="auth, ratelimit, cache, aggregate (default: all four)")
    p.add_argument("--build", type=Path, default=ROOT / "build", help="where the modules are (default: build/)")
    p.add_argument("--out", type=Path, default=ROOT / "dist" / "oci", help="output folder (default: dist/oci)")
    p.add_argument("--version", default=None, help="image tag (default: the Cargo workspace version)")
    args = p.parse_args(argv)
    version = args.version or workspace_version()
    unknown = [f for f in args.filters if f not in FILTERS]
    if unknown:
        p.error(f"unknown filter(s) {', '.join(unknown)}: choose from {', '.join(FILTERS)}")
    digests = {}
    for f in args.filters or FILTERS:
        image = image_for(f, version, args.build)
        out = write_layout(image, args.out / image.name)
        digests[f] = {"ref": image_ref(f, version), "manifest_sha256": image.digest,
                      "module_sha256": image.module_sha256, "layout": str(out)}
        print(f"oci: {out}  {image_ref(f, version)}  manifest sha256:{image.digest}")
    (args.out / "digests.json").write_text(json.dumps(digests, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
