#!/usr/bin/env python3
"""Writes a single-layer OCI image archive from static binaries (standard library only).

    python3 mkimage.py -o pause.tar --name kubeml.local/pause:1 --user 65535:65535 \\
        --entrypoint /pause --file /path/to/pause:/pause

The archive is an OCI image layout in a tar (oci-layout, index.json, blobs/sha256/...), the
form `ctr images import` reads; the image name travels in the index's
``io.containerd.image.name`` annotation. Everything is deterministic (mtime 0, owner root),
so the same binaries always give the same digests and the import is a no-op when nothing
changed.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"


def _layer(files: list[tuple[Path, str]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs: set[str] = set()
        for _source, target in files:
            parts = target.strip("/").split("/")[:-1]
            for i in range(1, len(parts) + 1):
                dirs.add("/".join(parts[:i]))
        for directory in sorted(dirs):
            info = tarfile.TarInfo(directory)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
            tar.addfile(info)
        for source, target in sorted(files, key=lambda f: f[1]):
            data = source.read_bytes()
            info = tarfile.TarInfo(target.strip("/"))
            info.size, info.mode, info.mtime = len(data), 0o755, 0
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _blob(tar: tarfile.TarFile, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    info = tarfile.TarInfo(f"blobs/sha256/{digest}")
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))
    return f"sha256:{digest}"


def build(output: Path, name: str, files: list[tuple[Path, str]], entrypoint: list[str], user: str,
          labels: dict[str, str]) -> str:
    layer = _layer(files)
    layer_digest = f"sha256:{hashlib.sha256(layer).hexdigest()}"
    config = json.dumps({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": entrypoint, "User": user, "Labels": labels,
                   "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        "history": [{"created_by": "hack/cluster/node/mkimage.py"}],
    }, sort_keys=True).encode()
    tmp = output.with_name(f".{output.name}.tmp")
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
        layout = json.dumps({"imageLayoutVersion": "1.0.0"}).encode()
        info = tarfile.TarInfo("oci-layout")
        info.size = len(layout)
        tar.addfile(info, io.BytesIO(layout))
        config_digest = _blob(tar, config)
        _blob(tar, layer)
        manifest = json.dumps({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [{"mediaType": OCI_LAYER, "digest": layer_digest, "size": len(layer)}],
            "annotations": {"org.opencontainers.image.title": name},
        }, sort_keys=True).encode()
        manifest_digest = _blob(tar, manifest)
        index = json.dumps({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": OCI_MANIFEST,
                "digest": manifest_digest,
                "size": len(manifest),
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {"io.containerd.image.name": name,
                                "org.opencontainers.image.ref.name": name.rpartition(":")[2]},
            }],
        }, sort_keys=True).encode()
        info = tarfile.TarInfo("index.json")
        info.size = len(index)
        tar.addfile(info, io.BytesIO(index))
    os.replace(tmp, output)
    return manifest_digest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--name", required=True, help="image reference, e.g. kubeml.local/pause:1")
    parser.add_argument("--file", action="append", required=True, metavar="SRC:DEST",
                        help="a file to put in the image (repeatable)")
    parser.add_argument("--entrypoint", required=True)
    parser.add_argument("--user", default="65535:65535")
    parser.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    files = []
    for spec in args.file:
        source, _, dest = spec.partition(":")
        if not dest.startswith("/") or not Path(source).is_file():
            parser.error(f"--file {spec!r}: want an existing SRC and an absolute DEST")
        files.append((Path(source), dest))
    labels = dict(label.split("=", 1) for label in args.label)
    print(build(args.output, args.name, files, [args.entrypoint], args.user, labels))


if __name__ == "__main__":
    main()
