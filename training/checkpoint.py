"""Training checkpoints: safe to load, verified before use.

A checkpoint is a directory::

    model.safetensors   model weights (the same layout a model bundle uses)
    state.safetensors   every other tensor: optimizer moments, RNG states, scaler
    state.json          the rest: epoch, step, scheduler, history, early-stopping state
    manifest.json       size and SHA-256 of the three files above; written last

Loading never unpickles anything: tensors come from safetensors, everything else from
JSON, and ``torch.load`` is not used at all. Nested state (an optimizer's ``state_dict``
with integer keys, tuples, numpy RNG arrays) is flattened into a JSON tree whose tensor
leaves point into ``state.safetensors``.

``manifest.json`` is the commit marker: a checkpoint whose manifest is missing, or whose
files differ from it in size or hash (a copy cut short by a dying node, a partial S3
upload), is reported as :class:`CheckpointCorrupt`, and :func:`load_latest_valid` falls back
to the newest earlier checkpoint that verifies.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kubeml._files import atomic_write_text, sha256_file
from kubeml.errors import CheckpointCorrupt

__all__ = [
    "FORMAT_VERSION",
    "CheckpointCorrupt",
    "TrainState",
    "checkpoint_dir_name",
    "epoch_of",
    "load_checkpoint",
    "load_latest_valid",
    "save_checkpoint",
    "verify_checkpoint",
]

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
TENSORS_FILE = "state.safetensors"
STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
_PAYLOAD = (MODEL_FILE, TENSORS_FILE, STATE_FILE)
_NAME = re.compile(r"^epoch-(\d{6})-([0-9a-f]+)$")


@dataclass
class TrainState:
    """Everything needed to continue a run exactly where a checkpoint left it."""

    epoch: int
    """Completed epochs."""
    global_step: int
    """Completed optimizer steps."""
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None = None
    rng: list[dict[str, Any]] = field(default_factory=list)
    """One entry per worker rank: python, numpy, torch (and CUDA) generator states."""
    history: list[dict[str, float]] = field(default_factory=list)
    """Per-epoch metrics of every completed epoch, including those before a restart."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Early-stopping state, attempts log, anything else JSON-able."""


def checkpoint_dir_name(epoch: int, attempt: str) -> str:
    """``epoch-000012-<attempt>``: sortable by epoch; the attempt token keeps a re-run of an
    epoch (after falling back past a corrupt checkpoint) from writing into an old directory."""
    return f"epoch-{epoch:06d}-{attempt}"


def epoch_of(name: str) -> int | None:
    m = _NAME.match(name)
    return int(m.group(1)) if m else None


# ------------------------------------------------------------------ flattening


def _flatten(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(obj, torch.Tensor):
        key = path or "t"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = path or "a"
        # safetensors' torch side has no uint32; int64 holds every uint32 exactly.
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj).astype(np.int64))
        return {"__ndarray__": key, "dtype": str(obj.dtype)}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"__dict__": {k: _flatten(v, tensors, f"{path}.{k}" if path else k) for k, v in obj.items()}}
        # Optimizer state is keyed by int parameter index; JSON would turn those into strings.
        return {"__items__": [[_flatten(k, tensors, f"{path}.k{i}"), _flatten(v, tensors, f"{path}.{i}")]
                              for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_flatten(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    raise TypeError(f"cannot store {type(obj).__name__} at {path!r} in a checkpoint (JSON or tensors only)")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return tensors[obj["__ndarray__"]].numpy().astype(obj["dtype"])
    if "__dict__" in obj:
        return {k: _unflatten(v, tensors) for k, v in obj["__dict__"].items()}
    if "__items__" in obj:
        return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__items__"]}
    if "__tuple__" in obj:
        return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
    raise CheckpointCorrupt(f"unknown node in {STATE_FILE}: {sorted(obj)}")


# ------------------------------------------------------------------ save / load


def save_checkpoint(directory: str | Path, state: TrainState) -> Path:
    """Write ``state`` into ``directory`` (created); the manifest goes last."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.model.items()}, str(out / MODEL_FILE))
    tensors: dict[str, torch.Tensor] = {}
    tree = {
        "format_version": FORMAT_VERSION,
        "epoch": state.epoch,
        "global_step": state.global_step,
        "optimizer": _flatten(state.optimizer, tensors, "optimizer"),
        "scheduler": _flatten(state.scheduler, tensors, "scheduler"),
        "scaler": _flatten(state.scaler, tensors, "scaler"),
        "rng": _flatten(state.rng, tensors, "rng"),
        "history": state.history,
        "extra": _flatten(state.extra, tensors, "extra"),
    }
    save_file(tensors, str(out / TENSORS_FILE))
    (out / STATE_FILE).write_text(json.dumps(tree))
    manifest = {
        "format_version": FORMAT_VERSION,
        "epoch": state.epoch,
        "files": {name: {"bytes": (out / name).stat().st_size, "sha256": sha256_file(out / name)} for name in _PAYLOAD},
    }
    # Atomic: a reader sees either no manifest (incomplete checkpoint) or the whole one.
    atomic_write_text(out / MANIFEST_FILE, json.dumps(manifest, indent=2))
    return out


def verify_checkpoint(directory: str | Path) -> dict[str, Any]:
    """Check every file against the manifest; return the manifest or raise :class:`CheckpointCorrupt`."""
    d = Path(directory)
    try:
        manifest = json.loads((d / MANIFEST_FILE).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise CheckpointCorrupt(f"{d}: no {MANIFEST_FILE} (checkpoint was never completed)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointCorrupt(f"{d}: unreadable {MANIFEST_FILE}: {exc}") from exc
    if manifest.get("format_version", 1) > FORMAT_VERSION:
        raise CheckpointCorrupt(f"{d}: checkpoint format {manifest['format_version']} is newer than this kubeml reads")
    for name in _PAYLOAD:
        p = d / name
        want = files.get(name)
        if want is None or not p.is_file():
            raise CheckpointCorrupt(f"{d}: {name} is missing")
        size = p.stat().st_size
        if size != want["bytes"]:
            raise CheckpointCorrupt(f"{d}: {name} has {size} bytes, manifest says {want['bytes']} (truncated)")
        if sha256_file(p) != want["sha256"]:
            raise CheckpointCorrupt(f"{d}: {name} does not match its SHA-256 (modified or corrupt)")
    return manifest


def load_checkpoint(directory: str | Path, *, device: str | torch.device = "cpu") -> TrainState:
    """Verify and load a checkpoint directory."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(directory)
    verify_checkpoint(d)
    try:
        model = load_file(str(d / MODEL_FILE), device=str(device))
        tensors = load_file(str(d / TENSORS_FILE))
        tree = json.loads((d / STATE_FILE).read_text())
    except (SafetensorError, ValueError, OSError) as exc:
        raise CheckpointCorrupt(f"{d}: cannot load: {exc}") from exc
    return TrainState(
        epoch=int(tree["epoch"]),
        global_step=int(tree["global_step"]),
        model=model,
        optimizer=_unflatten(tree["optimizer"], tensors),
        scheduler=_unflatten(tree["scheduler"], tensors),
        scaler=_unflatten(tree["scaler"], tensors),
        rng=_unflatten(tree["rng"], tensors),
        history=list(tree.get("history", [])),
        extra=_unflatten(tree.get("extra", {"__dict__": {}}), tensors),
    )


def load_latest_valid(checkpoint: Any, *, scratch: str | Path) -> tuple[TrainState | None, list[str]]:
    """Load ``checkpoint`` (a ``ray.train.Checkpoint``) or, if it is corrupt, the newest
    earlier sibling checkpoint of the same run that verifies.

    Returns ``(state or None, names of the corrupt checkpoints skipped)``. ``scratch`` is a
    local directory for copies of remote (S3) checkpoints.
    """
    from pyarrow.fs import FileSelector, FileType
    from ray.train import Checkpoint

    fs, path = checkpoint.filesystem, checkpoint.path.rstrip("/")
    parent, latest = path.rsplit("/", 1)
    latest_epoch = epoch_of(latest)
    candidates = [latest]
    if latest_epoch is not None:
        infos = fs.get_file_info(FileSelector(parent, allow_not_found=True))
        siblings = [i.base_name for i in infos if i.type == FileType.Directory and i.base_name != latest]
        older = [n for n in siblings if (e := epoch_of(n)) is not None and e <= latest_epoch]
        candidates += sorted(older, key=lambda n: epoch_of(n) or 0, reverse=True)
    skipped: list[str] = []
    for name in candidates:
        ckpt = Checkpoint(f"{parent}/{name}", filesystem=fs)
        local = Path(scratch) / name
        try:
            directory = ckpt.to_directory(str(local))
            return load_checkpoint(directory), skipped
        except CheckpointCorrupt:
            skipped.append(name)
    return None, skipped
