"""Model bundles: the unit that flows from training to registry to serving.

A bundle is a directory::

    model.safetensors     weights (safetensors: loading never executes code)
    kubeml-model.json     BundleSpec: architecture, input signature, classes, provenance

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

__all__ = ["SPEC_FILE", "WEIGHTS_FILE", "BundleSpec", "load_bundle", "read_spec", "save_bundle"]

SPEC_FILE = "kubeml-model.json"
WEIGHTS_FILE = "model.safetensors"
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
    return spec


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
