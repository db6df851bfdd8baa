"""Where the control-plane binaries live, and building them when they are missing.

The binaries are built from Go modules by ``hack/cluster/build.sh`` into a cache outside the
repository (``~/.cache/kubeml/k8s-v<version>/``); this module only finds them. It follows the
envtest convention: ``KUBEBUILDER_ASSETS`` names the ``bin`` directory when set.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from kubeml.errors import AssetsMissing

__all__ = ["Assets", "cache_root", "find_assets", "image_archive"]

#: Binaries of a complete asset set: the control plane in start order, then the clients
#: (kubectl installs the CRDs; helm is what the chart tests drive).
REQUIRED_BINARIES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
    "kubectl",
    "helm",
)

_REPO_ROOT = Path(__file__).resolve().parents[2]
_BUILD_SCRIPT = _REPO_ROOT / "hack" / "cluster" / "build.sh"
_VERSIONS_FILE = _REPO_ROOT / "hack" / "cluster" / "versions.env"
_BUILD_HINT = "run `make cluster-assets` (or `bash hack/cluster/build.sh`) to build them"


def cache_root() -> Path:
    """The kubeml cache directory: ``$KUBEML_CACHE_DIR``, else ``$XDG_CACHE_HOME/kubeml``."""
    if env := os.environ.get("KUBEML_CACHE_DIR"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "kubeml"


def _k8s_version() -> str | None:
    try:
        text = _VERSIONS_FILE.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "K8S_VERSION":
            return value.strip()
    return None


@dataclass(frozen=True)
class Assets:
    """The built control plane: ``bin/`` with the binaries, ``crds/``, ``kwok/stages.yaml``."""

    bin_dir: Path

    @property
    def root(self) -> Path:
        return self.bin_dir.parent

    @property
    def crds_dir(self) -> Path:
        return self.root / "crds"

    @property
    def kwok_stages(self) -> Path:
        return self.root / "kwok" / "stages.yaml"

    def binary(self, name: str) -> Path:
        return self.bin_dir / name

    def missing(self) -> list[str]:
        """Names of required files that are not there (empty when complete)."""
        absent = [n for n in REQUIRED_BINARIES if not os.access(self.binary(n), os.X_OK)]
        if not self.kwok_stages.is_file():
            absent.append("kwok/stages.yaml")
        if not any(self.crds_dir.glob("*.yaml")):
            absent.append("crds/*.yaml")
        return absent


def _default_bin_dir() -> Path | None:
    if env := os.environ.get("KUBEBUILDER_ASSETS"):
        return Path(env).expanduser()
    version = _k8s_version()
    if version is None:
        return None
    return cache_root() / f"k8s-v{version}" / "bin"


def find_assets(*, build: bool = False) -> Assets:
    """Locate the assets; with ``build=True`` run ``hack/cluster/build.sh`` when incomplete.

    A cold build compiles kube-apiserver and friends from source: tens of minutes on two
    cores. The build script is idempotent and locks against concurrent runs, so calling this
    from several processes at once is safe.
    """
    bin_dir = _default_bin_dir()
    if bin_dir is not None:
        assets = Assets(bin_dir)
        if not assets.missing():
            return assets
    if build and _BUILD_SCRIPT.is_file() and "KUBEBUILDER_ASSETS" not in os.environ:
        print(
            "kubeml.testing.cluster: control-plane assets missing; building them with "
            f"{_BUILD_SCRIPT} (a cold build takes tens of minutes)",
            file=sys.stderr,
        )
        result = subprocess.run(
            ["bash", str(_BUILD_SCRIPT)], stdout=subprocess.PIPE, stderr=None, text=True
        )
        if result.returncode != 0:
            raise AssetsMissing(
                f"building the control-plane assets failed (exit {result.returncode}); "
                f"see the build output above, fix it, then re-run `bash {_BUILD_SCRIPT}`"
            )
        assets = Assets(Path(result.stdout.strip().splitlines()[-1]))
        if not assets.missing():
            return assets
    if bin_dir is None:
        raise AssetsMissing(
            "cannot tell where the control-plane assets are: set KUBEBUILDER_ASSETS to the "
            f"directory holding {', '.join(REQUIRED_BINARIES)}, or {_BUILD_HINT}"
        )
    missing = Assets(bin_dir).missing()
    where = "KUBEBUILDER_ASSETS" if "KUBEBUILDER_ASSETS" in os.environ else "the asset cache"
    raise AssetsMissing(
        f"control-plane assets missing from {bin_dir} ({where}): {', '.join(missing)}; "
        f"{_BUILD_HINT}"
    )


def image_archive(kind: str) -> Path:
    """The OCI archive of kubeml image ``kind`` (``operator``, ``server``, ``runtime``) that
    ``make images`` (``hack/images/build.sh``) built last."""
    path = cache_root() / "images" / f"{kind}.tar"
    if not path.is_file():
        raise AssetsMissing(f"the {kind} image is not built ({path} is missing); run `make images` "
                            f"(or `bash hack/images/build.sh {kind}`) as root")
    return path
