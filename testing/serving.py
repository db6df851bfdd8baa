"""Test harness for serving: real model bundles and model servers started for one block.

    with served_bundle(write_digits_bundle(tmp / "digits"), name="digits", state_dir=tmp) as served:
        requests.post(served.v2_url, json=...)      # a real KServe model server process

The bundle is a real (untrained, seeded) digits CNN written with :func:`kubeml.bundle.save_bundle`,
so a test exercises the same load path as production; the server is started and stopped
through :class:`kubeml.serving.manager.ServingManager`, as ``kubeml serve deploy`` does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["DIGITS_CLASSES", "register_bundle", "served_bundle", "write_digits_bundle"]

DIGITS_CLASSES = tuple(str(i) for i in range(10))


def write_digits_bundle(directory: Path, *, seed: int = 0, **spec_overrides: Any) -> Path:
    """Write a seeded, untrained ``digits_cnn`` bundle (64 features in 0..16, ten classes)."""
    import torch

    from kubeml.bundle import BundleSpec, save_bundle
    from kubeml.models import build_model

    torch.manual_seed(seed)
    model = build_model("digits_cnn", **spec_overrides.pop("arch_kwargs_for_weights", {}))
    spec = BundleSpec(
        arch="digits_cnn",
        input_shape=(64,),
        classes=DIGITS_CLASSES,
        input_min=0.0,
        input_max=16.0,
        metadata={"purpose": "serving tests"},
        **spec_overrides,
    )
    save_bundle(directory, model, spec)
    return directory


@contextlib.contextmanager
def served_bundle(bundle_dir: Path, *, name: str, state_dir: Path, **deploy_kwargs: Any) -> Iterator[Any]:
    """Serve ``bundle_dir`` as ``name`` in a model server process; stop it when the block ends.

    Yields the :class:`~kubeml.serving.manager.ServedModel` (``url``, ``v1_url``, ``v2_url``).
    ``deploy_kwargs`` go to :meth:`ServingManager.deploy` (ports, batching, timeouts).
    """
    from kubeml.serving.manager import ServingManager

    manager = ServingManager(state_dir)
    try:
        yield manager.deploy(name, bundle_dir, **deploy_kwargs)
    finally:
        manager.stop(name)


def register_bundle(cfg: Any, bundle_dir: Path, *, model: str | None = None, versions: int = 1,
                    approve: bool = True) -> int:
    """Register ``bundle_dir`` in ``cfg``'s registry (with its digest) ``versions`` times,
    approved unless ``approve`` is False; returns the last version number.

    What ``kubeml deploy --version N --bundle DIR`` needs: the registry entry that pins DIR.
    """
    from kubeml.bundle import bundle_digest
    from kubeml.registry import BUNDLE_DIGEST_TAG, Registry

    registry = Registry(cfg.registry.tracking_uri, artifact_root=cfg.artifact_store.uri)
    digest = bundle_digest(bundle_dir)
    version = 0
    for _ in range(versions):
        version = registry.register(model or cfg.registry.model_name, Path(bundle_dir).resolve().as_uri(),
                                    metrics={"accuracy": 0.97}, auto_approve=approve,
                                    tags={BUNDLE_DIGEST_TAG: digest}).version  # fmt: skip
    return version
