"""Model bundles: the unit that flows from training to registry to serving.

A bundle is a directory::

    model.safetensors     weights (safetensors: loading never executes code)
    kubeml-model.json     BundleSpec: architecture, input signature, classes, provenance
    model.onnx            the ONNX graph, once exported (optional)
    kubeml-manifest.json  SHA-256 and size of every other file in the bundle

The manifest pins the whole bundle: its digest (:func:`bundle_digest`, the SHA-256 of the
manifest file) is what the registry records for a version and what every deploy path
checks (:func:`verify_bundle`), so a file swapped after registration, ONNX included, is
refused instead of served.

The architecture is rebuilt by name from :mod:`kubeml.models`, so a bundle holds
no pickled code at all.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kubeml._files import sha256_file
from kubeml.errors import BundleError

__all__ = [
    "MANIFEST_FILE",
    "SPEC_FILE",
    "WEIGHTS_FILE",
    "BundleSpec",
    "bundle_digest",
    "load_bundle",
    "read_spec",
    "save_bundle",
    "verify_bundle",
    "write_manifest",
]

SPEC_FILE = "kubeml-model.json"
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "kubeml-manifest.json"
#: Bumped when the layout changes incompatibly; readers refuse newer formats.
FORMAT_VERSION = 1


@dataclass(frozen=True)
class BundleSpec:
    """What a server needs to know to load and validate requests for a model."""

    arch: str
    """Registered architecture name (see ``kubeml.models.available_models``)."""
    input_shape: tuple[int, ...]
    """Shape of one instance, without the batch dimension, e.g. ``(64,)``."""
    classes: tuple[str, ...]
    """Class label per output index."""
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    input_dtype: str = "FP32"
    """Open Inference Protocol datatype of the input tensor."""
    input_min: float | None = None
    """Smallest valid feature value (None: unbounded)."""
    input_max: float | None = None
    """Largest valid feature value (None: unbounded)."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Provenance: dataset version, metrics, training run, ..."""
    weights_sha256: str = ""
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        d["classes"] = list(self.classes)
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> BundleSpec:
        try:
            d = json.loads(text)
            if d.get("format_version", 1) > FORMAT_VERSION:
                raise BundleError(
                    f"bundle format {d['format_version']} is newer than this kubeml "
                    f"understands ({FORMAT_VERSION}); upgrade kubeml"
                )
            d["input_shape"] = tuple(int(x) for x in d["input_shape"])
            d["classes"] = tuple(str(c) for c in d["classes"])
            return cls(**d)
        except BundleError:
            raise
        except (ValueError, TypeError, KeyError) as exc:
            raise BundleError(f"invalid {SPEC_FILE}: {exc}") from exc


def save_bundle(directory: str | Path, model: Any, spec: BundleSpec) -> BundleSpec:
    """Write ``model``'s weights and ``spec`` into ``directory``; return the spec with its hash."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = out / WEIGHTS_FILE
    save_file(state, str(weights))
    spec = BundleSpec(**{**asdict(spec), "weights_sha256": sha256_file(weights)})
    (out / SPEC_FILE).write_text(spec.to_json())
    write_manifest(out)
    return spec


def _bundle_files(directory: Path) -> list[Path]:
    entries = sorted(directory.rglob("*"))
    links = [str(p) for p in entries if p.is_symlink()]
    if links:
        raise BundleError(f"{directory}: a bundle may not contain symbolic links ({', '.join(links[:3])})")
    return [p for p in entries if p.is_file() and p.name != MANIFEST_FILE and not p.name.endswith(".tmp")]


def write_manifest(directory: str | Path) -> str:
    """(Re)write the manifest of every file in the bundle; returns the bundle's digest.

    Called by :func:`save_bundle` and by whatever adds a file later (ONNX export).
    """
    from kubeml._files import atomic_write_text

    out = Path(directory)
    files = {
        p.relative_to(out).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in _bundle_files(out)
    }
    atomic_write_text(out / MANIFEST_FILE, json.dumps({"format_version": 1, "files": files},
                                                      indent=2, sort_keys=True) + "\n")
    return bundle_digest(out)


def bundle_digest(directory: str | Path) -> str:
    """``sha256:<hex>`` of the bundle's manifest file: one value that pins every file."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise BundleError(f"{directory}: {MANIFEST_FILE} is missing (a bundle written before manifests, "
                          "or not a bundle); re-export or retrain it")
    return "sha256:" + sha256_file(path)


def verify_bundle(directory: str | Path, expected_digest: str | None = None) -> str:
    """Check every file of the bundle against its manifest, and the manifest against
    ``expected_digest`` (the registry's record) when given; returns the digest.

    Raises :class:`~kubeml.errors.BundleError` naming what differs: a digest that is not
    the registered one, a file changed, missing or added.
    """
    out = Path(directory)
    digest = bundle_digest(out)
    if expected_digest is not None and digest != expected_digest:
        raise BundleError(f"{out}: bundle digest {digest} is not the registered {expected_digest}; "
                          "the bundle was changed after registration, refusing it")
    try:
        files = json.loads((out / MANIFEST_FILE).read_text())["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"{out}: unreadable {MANIFEST_FILE}: {exc}") from exc
    present = {p.relative_to(out).as_posix(): p for p in _bundle_files(out)}
    added = sorted(set(present) - set(files))
    missing = sorted(set(files) - set(present))
    if added or missing:
        raise BundleError(f"{out}: files differ from {MANIFEST_FILE} (added: {added or 'none'}, "
                          f"missing: {missing or 'none'})")
    for name, want in files.items():
        path = present[name]
        if path.stat().st_size != want["bytes"] or sha256_file(path) != want["sha256"]:
            raise BundleError(f"{path}: content differs from {MANIFEST_FILE} (truncated or modified file)")
    return digest


def read_spec(directory: str | Path) -> BundleSpec:
    path = Path(directory) / SPEC_FILE
    if not path.is_file():
        raise BundleError(f"{directory} is not a model bundle: {SPEC_FILE} is missing")
    return BundleSpec.from_json(path.read_text())


def load_bundle(directory: str | Path, *, device: str = "cpu"):
    """Rebuild the model from a bundle; returns ``(model in eval mode, spec)``.

    The weights' SHA-256 is checked against the spec, so a truncated or swapped file is
    reported instead of being half-loaded.
    """
    from safetensors.torch import load_file

    from kubeml.models import build_model

    spec = read_spec(directory)
    weights = Path(directory) / WEIGHTS_FILE
    if not weights.is_file():
        raise BundleError(f"{directory}: {WEIGHTS_FILE} is missing")
    if spec.weights_sha256 and sha256_file(weights) != spec.weights_sha256:
        raise BundleError(f"{weights}: checksum mismatch (truncated or modified file)")
    model = build_model(spec.arch, **spec.arch_kwargs)
    try:
        model.load_state_dict(load_file(str(weights), device=device))
    except (RuntimeError, OSError) as exc:
        raise BundleError(f"{weights}: cannot load weights: {exc}") from exc
    model.eval()
    return model.to(device), spec
