"""Where a stage finds a model bundle on local disk (downloading it from S3 when needed)."""

from __future__ import annotations

from pathlib import Path

from kubeml.errors import ArtifactNotFound, RegistryError

__all__ = ["bundle_key_from_url", "local_bundle"]


def local_bundle(cfg, store, bundle_key: str, dest_name: str) -> Path:
    """The bundle at ``bundle_key`` as a local directory: in place for a file store, else a cache copy."""
    local = store.local_path(bundle_key)
    if local is not None:
        return local
    dest = Path(cfg.home) / "cache" / "bundles" / dest_name
    return store.get_dir(bundle_key, dest)


def bundle_key_from_url(store, url: str) -> str:
    """The store key of a registry version's ``source`` URL; refuses one outside the store."""
    root = store.uri.rstrip("/") + "/"
    if not url.startswith(root):
        raise RegistryError(f"model source {url} is outside the artifact store {store.uri}")
    key = url[len(root):]
    if not store.list(key):
        raise ArtifactNotFound(f"model bundle {url} is missing from the artifact store")
    return key
