"""Multi-model serving: a directory of bundles, loaded on demand under a memory cap.

Where it sits: kserve's ``ModelRepository`` behind the Open Inference Protocol model
repository extension (``POST /v2/repository/models/NAME/load|unload``,
``POST /v2/repository/index``). ``python -m kubeml.serving.server --models-dir DIR``
serves every bundle under ``DIR/NAME/``; a model is loaded when asked to, and when loading it would take the
server over its memory cap, the least recently used models are unloaded first.

Memory is accounted per model as the size of its weights file (float32 weights dominate
a small CNN's resident size; the runtime itself is shared). A model larger than the
whole cap is refused rather than evicting everything for nothing.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from kubeml.bundle import SPEC_FILE, WEIGHTS_FILE
from kubeml.errors import BundleError
from kubeml.serving._kserve import ModelRepository

__all__ = ["BundleRepository"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class BundleRepository(ModelRepository):
    """Bundles under ``models_dir``, loaded on demand, evicted least-recently-used first."""

    def __init__(
        self,
        models_dir: str | Path,
        *,
        max_memory_bytes: int,
        runtime: str = "pytorch",
        telemetry: bool = True,
    ):
        super().__init__(str(models_dir))
        if max_memory_bytes < 1:
            raise ValueError(f"max_memory_bytes must be >= 1, got {max_memory_bytes}")
        self.root = Path(models_dir)
        self.max_memory_bytes = max_memory_bytes
        self.runtime = runtime
        self.telemetry = telemetry
        self.evictions: list[str] = []
        """Names unloaded to make room, oldest first (for logs and tests)."""
        self._lru: OrderedDict[str, int] = OrderedDict()  # name -> accounted bytes
        self._lock = threading.RLock()

    # -- accounting --------------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(self._lru.values())

    def loaded(self) -> list[str]:
        """Loaded model names, least recently used first."""
        with self._lock:
            return list(self._lru)

    def _bundle(self, name: str) -> Path:
        if not _NAME.match(name):
            raise BundleError(f"model name {name!r} is not a bundle name (letters, digits, '.', '_', '-')")
        path = self.root / name
        if not (path / SPEC_FILE).is_file():
            raise BundleError(f"no bundle named {name!r} in {self.root}")
        return path

    def _footprint(self, bundle: Path) -> int:
        weights = bundle / ("model.onnx" if self.runtime == "onnx" else WEIGHTS_FILE)
        if not weights.is_file():
            raise BundleError(f"{bundle}: {weights.name} is missing")
        return weights.stat().st_size

    # -- kserve ModelRepository --------------------------------------------------------------

    def get_model(self, name: str) -> Any:
        model = super().get_model(name)
        if model is not None:
            with self._lock:
                if name in self._lru:
                    self._lru.move_to_end(name)
        return model

    def load(self, name: str) -> bool:
        return self.load_model(name)

    def load_model(self, name: str) -> bool:
        with self._lock:
            if name in self._lru:
                self._lru.move_to_end(name)
                return True
            bundle = self._bundle(name)
            need = self._footprint(bundle)
            if need > self.max_memory_bytes:
                raise BundleError(
                    f"model {name!r} needs {need} bytes, more than the server's whole cap of "
                    f"{self.max_memory_bytes}; raise --max-memory-mb"
                )
            while self._lru and self.used_bytes + need > self.max_memory_bytes:
                victim, _ = self._lru.popitem(last=False)
                super().unload(victim)
                self.evictions.append(victim)
            model = self._new_model(name, bundle)
            model.load()
            self.update(model)
            self._lru[name] = need
            return True

    def unload(self, name: str) -> None:
        with self._lock:
            super().unload(name)  # KeyError for an unknown model -> 404
            self._lru.pop(name, None)

    def _new_model(self, name: str, bundle: Path) -> Any:
        from kubeml.bundle import read_spec
        from kubeml.serving.model import BundleModel

        if self.runtime == "onnx":
            from kubeml.serving.onnx_model import OnnxBundleModel as model_class
        else:
            model_class = BundleModel
        spec = read_spec(bundle)
        version = str(spec.metadata.get("version", "")) if spec.metadata else ""
        model = model_class(name, bundle, version=version)
        if self.telemetry:
            from kubeml.serving.telemetry import ModelTelemetry

            model.telemetry = ModelTelemetry(name, version, tuple(spec.classes))
        model.loaded_at = time.time()
        return model
