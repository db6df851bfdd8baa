"""Model registry on MLflow, with an approval workflow.

Each registered version carries tags: the metrics it was gated on, the dataset version,
the code version, and ``approval_status`` (``approved`` / ``pending`` / ``rejected``).
Environments with ``approval: auto`` (dev) approve on registration; the others leave the
version pending until someone runs ``kubeml models approve``. Only approved versions may
be deployed.

The model version's ``source`` is the bundle's URI in the artifact store, so the registry
points at the artifact instead of copying it.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from kubeml.errors import RegistryError

__all__ = ["APPROVAL_STATES", "AUTHOR_TAG", "BUNDLE_DIGEST_TAG", "current_user", "ModelVersionInfo", "Registry", "code_version", "verified_bundle"]

APPROVAL_STATES = ("approved", "pending", "rejected")
#: MLflow's client retries a tracking server that does not answer 7 times with a doubling
#: backoff and waits 120 s per request: minutes before a command learns the server is down.
#: These bound it to seconds; a user's own MLFLOW_HTTP_REQUEST_* settings win.
HTTP_CLIENT_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
APPROVAL_TAG = "approval_status"
#: Version tag naming who registered a version (the pipeline's identity); in a manual
#: environment that person may not approve it.
AUTHOR_TAG = "registered_by"
#: Version tag holding the registered bundle's digest (``sha256:<hex>`` of its manifest,
#: :func:`kubeml.bundle.bundle_digest`); every deploy path checks the bundle against it.
BUNDLE_DIGEST_TAG = "bundle_digest"


def current_user() -> str:
    """Who is acting: ``$KUBEML_USER`` (set it to a real identity in CI and pipelines), else ``$USER``."""
    return os.environ.get("KUBEML_USER") or os.environ.get("USER") or "unknown"


def code_version(path: str | Path = ".") -> str:
    """``git:<sha>[-dirty]`` of the checkout at ``path``, or ``kubeml:<package version>`` outside git."""
    try:
        sha = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()
        return f"git:{sha}" + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import version

        return f"kubeml:{version('kubeml')}"


@dataclass(frozen=True)
class ModelVersionInfo:
    name: str
    version: int
    source: str
    approval_status: str
    run_id: str
    tags: dict[str, str]

    @property
    def approved(self) -> bool:
        return self.approval_status == "approved"


class Registry:
    """A thin, typed layer over MLflow's client for kubeml's registration rules."""

    def __init__(self, tracking_uri: str, *, artifact_root: str | None = None):
        import mlflow
        from mlflow import MlflowClient

        if tracking_uri.startswith("sqlite:///"):
            Path(tracking_uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = tracking_uri
        self.artifact_root = artifact_root
        if self.shared:
            for name, value in HTTP_CLIENT_DEFAULTS.items():
                os.environ.setdefault(name, value)
        mlflow.set_tracking_uri(tracking_uri)
        self._client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    @property
    def shared(self) -> bool:
        """Whether this is a tracking server (``http(s)://``) rather than a local database."""
        return self.tracking_uri.startswith(("http://", "https://"))

    def _cause(self, exc: Exception) -> str:
        text = str(exc)
        if self.shared and ("Failed to establish a new connection" in text or "Max retries exceeded" in text
                            or "timed out" in text):
            return (f"the tracking server did not answer ({text.rsplit('Caused by ', 1)[-1].strip('()')}); "
                    "check the environment's registry.tracking_uri and that the server runs")
        return text

    def _experiment_id(self, name: str) -> str:
        exp = self._client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        # A tracking server places (and proxies) its experiments' artifacts itself, so clients
        # need no credentials for its store; a local database keeps them beside our artifacts.
        location = (f"{self.artifact_root.rstrip('/')}/mlflow/{name}"
                    if self.artifact_root and not self.shared else None)
        return self._client.create_experiment(name, artifact_location=location)

    def register(
        self,
        model_name: str,
        source: str,
        *,
        metrics: dict[str, float],
        params: dict[str, object] | None = None,
        tags: dict[str, str] | None = None,
        auto_approve: bool,
        description: str = "",
    ) -> ModelVersionInfo:
        """Log a run with metrics/params and create the next version of ``model_name``."""
        from mlflow.exceptions import MlflowException

        if self.shared and source.startswith(("file:", "/")):
            raise RegistryError(f"the tracking server at {self.tracking_uri} cannot register {source}: a path on "
                                "this machine means nothing to the server or to other pods; give the environment "
                                "an artifact_store.uri on S3 (s3://...)")
        tags = {k: str(v) for k, v in (tags or {}).items()}
        status = "approved" if auto_approve else "pending"
        try:
            exp_id = self._experiment_id(f"kubeml/{model_name}")
            run = self._client.create_run(exp_id, tags={"kubeml.model": model_name, **tags})
            for k, v in (params or {}).items():
                self._client.log_param(run.info.run_id, k, str(v))
            for k, v in metrics.items():
                self._client.log_metric(run.info.run_id, k, float(v))
            self._client.set_terminated(run.info.run_id)
            try:
                self._client.get_registered_model(model_name)
            except MlflowException:
                self._client.create_registered_model(model_name, description="registered by kubeml")
            version_tags = {
                **tags,
                **{f"metric.{k}": f"{float(v):.6f}" for k, v in metrics.items()},
                APPROVAL_TAG: status,
                "registered_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            if auto_approve:
                version_tags["approved_by"] = "auto (environment approval: auto)"
            mv = self._client.create_model_version(
                model_name, source=source, run_id=run.info.run_id, tags=version_tags,
                description=description, await_creation_for=0,
            )
        except MlflowException as exc:
            raise RegistryError(f"registering {model_name} at {self.tracking_uri} failed: {self._cause(exc)}") from exc
        return self.get(model_name, int(mv.version))

    def get(self, model_name: str, version: int) -> ModelVersionInfo:
        from mlflow.exceptions import MlflowException

        try:
            mv = self._client.get_model_version(model_name, str(version))
        except MlflowException as exc:
            raise RegistryError(f"{model_name} version {version} is not registered") from exc
        return ModelVersionInfo(
            name=model_name,
            version=int(mv.version),
            source=mv.source,
            approval_status=mv.tags.get(APPROVAL_TAG, "pending"),
            run_id=mv.run_id or "",
            tags=dict(mv.tags),
        )

    def versions(self, model_name: str) -> list[ModelVersionInfo]:
        from mlflow.exceptions import MlflowException

        try:
            found = self._client.search_model_versions(f"name='{model_name}'")
        except MlflowException as exc:
            raise RegistryError(f"listing versions of {model_name} at {self.tracking_uri} failed: "
                                f"{self._cause(exc)}") from exc
        return sorted((self.get(model_name, int(m.version)) for m in found), key=lambda m: m.version)

    def set_approval(
        self,
        model_name: str,
        version: int,
        status: str,
        *,
        by: str | None = None,
        signature: str | None = None,
        distinct_approver: bool = False,
    ) -> ModelVersionInfo:
        """Record ``status`` for a version, by ``by`` (default: the current user).

        ``signature`` (:func:`kubeml.approvals.sign_approval`) is stored with an approval; any
        other decision clears an earlier one. ``distinct_approver`` (manual environments)
        refuses an approval by the version's author (its ``registered_by`` tag).
        """
        from kubeml.approvals import SIGNATURE_TAG
        from kubeml.errors import ApprovalError

        if status not in APPROVAL_STATES:
            raise RegistryError(f"unknown approval status {status!r}; allowed values: {', '.join(APPROVAL_STATES)}")
        mv = self.get(model_name, version)  # raises a clear error for an unknown version
        who = by or current_user()
        author = mv.tags.get(AUTHOR_TAG)
        if status == "approved" and distinct_approver and author and author == who:
            raise ApprovalError(f"{model_name} version {version} was registered by {who!r}, who may not also "
                                "approve it in this environment; another person must approve it")
        self._client.set_model_version_tag(model_name, str(version), APPROVAL_TAG, status)
        self._client.set_model_version_tag(model_name, str(version), f"{status}_by", who)
        self._client.set_model_version_tag(model_name, str(version), SIGNATURE_TAG,
                                           signature if status == "approved" and signature else "")
        return self.get(model_name, version)


def verified_bundle(mv: ModelVersionInfo, bundle_dir: str | Path, *, public_key: str | None = None) -> str:
    """Check a downloaded bundle against the digest registered for ``mv`` and, with
    ``public_key`` (the environment's ``signing.public_key``), the approval's signature over
    that digest; returns the digest.

    The one check every deploy path makes. A version registered without a digest is
    refused too: nothing would tell its bundle from a swapped one.
    """
    from kubeml.approvals import SIGNATURE_TAG, check_signature, load_public_key
    from kubeml.bundle import verify_bundle
    from kubeml.errors import ApprovalError, BundleError

    expected = mv.tags.get(BUNDLE_DIGEST_TAG)
    if not expected:
        raise BundleError(f"{mv.name} version {mv.version} has no registered bundle digest; it cannot be "
                          "verified, so it is not deployed (register the bundle again)")
    if public_key is not None:
        signature = mv.tags.get(SIGNATURE_TAG)
        if not signature:
            raise ApprovalError(f"{mv.name} version {mv.version} has no signed approval, and this environment "
                                "verifies them (signing.public_key); approve it with the signing key set")
        check_signature(load_public_key(public_key), signature, model=mv.name, version=mv.version,
                        digest=expected, approver=mv.tags.get("approved_by", ""))
    return verify_bundle(bundle_dir, expected)
