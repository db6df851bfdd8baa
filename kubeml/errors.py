"""The kubeml exception tree: the one place every error kubeml raises on purpose is declared.

    KubemlError                    retryable  meaning
    ├── ConfigError                no         bad kubeml.yaml / argument; names the key and the fix
    ├── ArtifactError              yes        the artifact store could not complete an operation
    │   └── ArtifactNotFound       no         nothing at that key (retrying finds nothing either)
    ├── DataValidationError        no         the dataset violates constraints; lists every one
    ├── BundleError                no         a model bundle is missing, truncated or inconsistent
    ├── ApprovalError              no         an approval is missing, refused, or its signature does not verify
    ├── StageFailed                no         a stage's earlier attempt failed with a non-retryable error
    ├── RegistryError              yes        the model registry (MLflow) could not complete
    ├── ServingError               yes        a model server could not be started, reached, stopped
    │   └── ServingRequestError    by status  the server answered an error (5xx/none: yes, 4xx: no)
    ├── TrainingFailed             yes        a Ray Train run failed; a retry resumes from checkpoints
    │   └── CheckpointCorrupt      no         a checkpoint is incomplete or fails its manifest
    ├── JobError                   yes        a cluster training job did not run to success
    │   ├── JobApiError            by status  the Kubernetes API refused (4xx: no) or failed (429/5xx/none: yes)
    │   ├── JobFailed              yes        it ended unsuccessfully (a retry replaces it)
    │   ├── JobTimedOut            yes        the wait ran out; the job keeps running (a retry adopts it)
    │   ├── JobStalled             no         its Ray cluster never got ready (unschedulable, image, head)
    │   ├── JobCancelled           no         the wait was cancelled and the job deleted
    │   └── JobConflict            no         its name is taken by another run's or spec's object
    ├── PipelineError              yes        Kubeflow Pipelines could not take a pipeline or a run
    │   ├── PipelineCompileError   no         the pipeline did not compile to KFP IR; names the cause
    │   ├── KfpUnreachable         yes        no answer from the KFP API host (DNS, refused, TLS, timeout)
    │   └── KfpAuthError           no         the KFP API refused the credentials (401, 403, a login page)
    └── ClusterError               no         the local control plane could not start, be reached, stop
        ├── AssetsMissing          no         binaries/CRDs not built; says which command builds them
        ├── PortInUse              no         a requested port is taken; says how to pick another
        ├── ClusterAlreadyRunning  no         a live cluster owns the state directory
        └── ComponentFailed        no         a component exited or never became healthy; log tail

``retryable`` tells a caller that retries (the pipeline's stage runner, a CLI loop) whether
the same call could succeed later: a transient outage is worth a backoff, a configuration
mistake never is. It is a class attribute, overridden per instance only where the answer
depends on what happened (``ServingRequestError``'s status code).

Every error pickles (it crosses Ray and KFP process boundaries), so subclasses keep their
constructor arguments in ``self.args``.

>>> import pickle
>>> err = pickle.loads(pickle.dumps(PortInUse(8080, "router")))
>>> (type(err).__name__, err.port, err.retryable)
('PortInUse', 8080, False)
>>> is_retryable(ArtifactError("S3 throttled")), is_retryable(ConfigError("bad key"))
(True, False)
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "ApprovalError",
    "ArtifactError",
    "ArtifactNotFound",
    "AssetsMissing",
    "BundleError",
    "CheckpointCorrupt",
    "ClusterAlreadyRunning",
    "ClusterError",
    "ComponentFailed",
    "ConfigError",
    "DataValidationError",
    "JobApiError",
    "JobCancelled",
    "JobStalled",
    "JobConflict",
    "JobError",
    "JobFailed",
    "JobTimedOut",
    "KfpAuthError",
    "KfpUnreachable",
    "KubemlError",
    "PipelineCompileError",
    "PipelineError",
    "PortInUse",
    "RegistryError",
    "ServingError",
    "ServingRequestError",
    "StageFailed",
    "TrainingFailed",
    "is_retryable",
]


class KubemlError(Exception):
    """Base of every error kubeml raises on purpose."""

    retryable: ClassVar[bool] = False
    """Whether the same call may succeed if made again later (see the tree above)."""


def is_retryable(exc: BaseException) -> bool:
    """True when ``exc`` is worth retrying: a retryable kubeml error.

    Anything else (a bug, a ``KeyboardInterrupt``) is not: retrying a bug repeats it.
    """
    return isinstance(exc, KubemlError) and bool(exc.retryable)


# ------------------------------------------------------------------------------ core


class ConfigError(KubemlError):
    """Configuration or argument is invalid; the message names the key and the fix."""


class ArtifactError(KubemlError):
    """The artifact store could not complete an operation."""

    retryable = True


class ArtifactNotFound(ArtifactError):
    """No artifact exists at the given key."""

    retryable = False


class DataValidationError(KubemlError):
    """A dataset violates one or more constraints.

    ``failures`` is a tuple of human-readable strings, one per failing constraint.
    """

    def __init__(self, failures: list[str] | tuple[str, ...]):
        self.failures = tuple(failures)
        super().__init__(self.failures)

    def __str__(self) -> str:
        lines = "\n".join(f"  - {f}" for f in self.failures)
        return f"data validation failed ({len(self.failures)} constraint(s)):\n{lines}"


class BundleError(KubemlError):
    """A model bundle could not be written or read."""


class ApprovalError(KubemlError):
    """A version may not be approved (the approver wrote it) or deployed (its approval
    signature is missing or does not verify)."""


class StageFailed(KubemlError):
    """An earlier attempt of this pipeline stage, with the same inputs, failed with an error
    no retry can fix; the orchestrator's retry is refused at once with that error's text."""


class RegistryError(KubemlError):
    """The model registry rejected or could not complete an operation."""

    retryable = True


# --------------------------------------------------------------------------- serving


class ServingError(KubemlError):
    """A model server could not be started, reached or stopped."""

    retryable = True


class ServingRequestError(ServingError):
    """The server answered with an error status; ``status_code`` says which (None: no answer)."""

    def __init__(self, message: str, status_code: int | None = None):
        super().__init__(message, status_code)

    @property
    def status_code(self) -> int | None:
        return self.args[1]

    @property
    def retryable(self) -> bool:  # type: ignore[override]
        # A 4xx is the request's fault and will be refused again; a 5xx or no answer may heal.
        code = self.status_code
        return code is None or code >= 500

    def __str__(self) -> str:
        return self.args[0]


# -------------------------------------------------------------------------- training


class TrainingFailed(KubemlError):
    """A training run failed and was not (or could no longer be) recovered.

    Retryable: a new attempt resumes from the last good checkpoint."""

    retryable = True


class CheckpointCorrupt(TrainingFailed):
    """A checkpoint is incomplete or does not match its manifest."""

    retryable = False


class JobError(KubemlError):
    """A cluster training job could not be run to success (base of the errors below)."""

    retryable = True


class JobApiError(JobError):
    """The Kubernetes API refused or failed an operation on a job; ``status`` is its HTTP status.

    Retryable by status: a refusal (401/403 RBAC, 404, 422 schema, any other 4xx) is the
    request's fault and comes back the same; throttling (429), a failing apiserver (5xx) or no
    answer at all (``0``/None: the connection was lost) may heal.
    """

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message, status)

    @property
    def status(self) -> int | None:
        return self.args[1]

    @property
    def retryable(self) -> bool:  # type: ignore[override]
        code = self.status
        return not code or code == 429 or code >= 500

    def __str__(self) -> str:
        return self.args[0]


class JobFailed(JobError):
    """The job ended unsuccessfully; ``status_message`` is what its controller reported.

    Retryable: a retried step replaces a failed job of its run."""

    def __init__(self, message: str, status_message: str = ""):
        super().__init__(message, status_message)
        self.status_message = status_message

    def __str__(self) -> str:
        return self.args[0]


class JobTimedOut(JobError):
    """The job did not finish within the wait; it is left running (a retry adopts it)."""


class JobStalled(JobError):
    """The job made no progress and will not by itself: its Ray cluster never became ready
    (a pod that cannot be scheduled, an image that cannot be pulled, a head that never turns
    Ready). The message names the cause. Not retryable: a retry stalls the same way until
    the cause is fixed. The job is left in place for inspection."""

    retryable = False


class JobCancelled(JobError):
    """The wait was cancelled; the job was deleted."""

    retryable = False


class JobConflict(JobError):
    """An object of the job's name exists but belongs to another run or another spec."""

    retryable = False


# --------------------------------------------------------------- local control plane


class PipelineError(KubemlError):
    """Kubeflow Pipelines could not take the pipeline or a run of it (base of the errors below).

    Retryable: an API call that failed on the server side may succeed later."""

    retryable = True


class PipelineCompileError(PipelineError):
    """The pipeline definition did not compile to KFP IR; nothing was submitted."""

    retryable = False


class KfpUnreachable(PipelineError):
    """The KFP API host gave no answer (name resolution, connection refused, TLS, timeout)."""


class KfpAuthError(PipelineError):
    """The KFP API refused the request's credentials: 401, 403, or a login page instead of JSON."""

    retryable = False


class ClusterError(KubemlError):
    """The local control plane could not be started, reached or stopped."""


class AssetsMissing(ClusterError):
    """The control-plane binaries or generated CRDs are not where the launcher looks."""


class PortInUse(ClusterError):
    """A port a server was asked to listen on is already taken."""

    def __init__(self, port: int, component: str):
        self.port = port
        self.component = component
        super().__init__(port, component)

    def __str__(self) -> str:
        return (
            f"port {self.port} (for {self.component}) is already in use on 127.0.0.1; "
            f"stop whatever listens there (`ss -ltnp 'sport = :{self.port}'` shows it), "
            f"or pass port 0 to pick a free one"
        )


class ClusterAlreadyRunning(ClusterError):
    """Another live cluster owns the state directory."""

    def __init__(self, name: str, server: str):
        self.name = name
        self.server = server
        super().__init__(name, server)

    def __str__(self) -> str:
        return (
            f"cluster {self.name!r} is already running at {self.server}; use it, "
            f"or stop it first with `kubeml cluster down --name {self.name}`"
        )


class ComponentFailed(ClusterError):
    """A control-plane component exited early or did not become healthy in time."""

    def __init__(self, component: str, reason: str, log_tail: str = "", log_path: str = ""):
        self.component = component
        self.reason = reason
        self.log_tail = log_tail
        self.log_path = log_path
        super().__init__(component, reason, log_tail, log_path)

    def __str__(self) -> str:
        text = f"{self.component}: {self.reason}"
        if self.log_path:
            text += f" (full log: {self.log_path})"
        if self.log_tail:
            text += "\n--- last lines of its log ---\n" + self.log_tail
        return text
