"""Submit a training job to Kubernetes, follow it to the end, cancel it: the one module of
``kubeml.training`` that talks to the Kubernetes API.

Where it sits: :mod:`~kubeml.training.launchers.kuberay` and
:mod:`~kubeml.training.launchers.sagemaker` build the manifests (a KubeRay ``RayJob``, an ACK
SageMaker ``TrainingJob``); :mod:`~kubeml.training.launchers._cluster` puts manifest, job and
result record together for the cluster launchers. Their callers are the pipeline's train
stage (inside a KFP step: KFP v2 has no ``ResourceOp``, so the step itself creates the
object and waits for it) and ``kubeml train --target kuberay|sagemaker``. Client loading is
:mod:`kubeml._kube`'s.

Life of a job (:func:`run_job`)
-------------------------------
1. The object is created with ``CustomObjectsApi`` and two annotations: ``kubeml.io/run-id``
   and ``kubeml.io/spec-sha256`` (a hash of the spec as built, before apiserver defaulting).
2. If an object of that name exists (HTTP 409: KFP retried the step, or the command ran
   again) it is *adopted* when it belongs to the same run and was built from the same spec,
   and followed to the end as if just created. One that already *failed* is deleted and
   created again (the new job resumes from the run's checkpoints in the artifact store). One
   of another run or another spec is a :class:`JobConflict`: nothing is touched.
3. The status is read every ``poll_s`` seconds; each change is logged (logger
   ``kubeml.training.launch``) and handed to ``on_status``. Transient API errors (5xx, 429,
   lost connections) are retried until the deadline: a blip must not fail a day-long run.
4. Terminal states. RayJob: ``.status.jobDeploymentStatus`` ``Complete`` (success only with
   ``.status.jobStatus`` ``SUCCEEDED``; ``FAILED``/``STOPPED`` are failures), ``Failed`` or
   ``ValidationFailed``; ``Retrying`` (a failed attempt within ``backoffLimit``) is not the
   end. TrainingJob: ``.status.trainingJobStatus`` ``Completed``, ``Failed`` or ``Stopped``,
   or the ACK condition ``ACK.Terminal`` (the controller gave up, e.g. an invalid spec: the
   job never reached SageMaker). A failure raises :class:`JobFailed` with the status message
   (RayJob ``.status.message``, SageMaker ``failureReason``, the condition's message).
5. Cancel: ``stop`` set (:func:`cancel_on_sigterm` sets it when KFP terminates the step's
   pod) deletes the job (KubeRay tears the Ray cluster down; ACK stops the SageMaker job)
   and raises :class:`JobCancelled`.
6. Timeout: :class:`JobTimedOut` names the last status. The job is left running, so a
   retried step adopts it instead of starting over.
7. Stall (RayJob): a job whose Ray cluster is not running after ``stall_s`` (its
   ``jobDeploymentStatus`` still empty, ``New``, ``Initializing`` or ``Waiting``) raises
   :class:`JobStalled` with the cause, instead of waiting out the day. Where the waiter may
   also list pods in the job's namespace (not in :data:`RBAC_RULES`; grant it for better
   messages and earlier detection), the cause is read from the Ray pods: a container that
   cannot start its image (``ErrImagePull``, ``ImagePullBackOff``, ``ErrImageNeverPull``,
   ``InvalidImageName``, ``CreateContainerConfigError``) stalls the job after
   ``image_grace_s``, whatever ``stall_s`` says; a pod the scheduler cannot place is quoted
   with the scheduler's message. Without that permission the cause comes from the RayJob's
   own status (the Ray cluster's conditions).

An API answer that is not a transient one raises :class:`JobApiError`, whose ``retryable``
follows the HTTP status: a refusal (401/403/404/422, any other 4xx) comes back the same on a
retry, a throttled or failing apiserver (429, 5xx) or a lost connection may not.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from kubeml._kube import custom_objects_api
from kubeml.errors import (
    ConfigError,
    JobApiError,
    JobCancelled,
    JobConflict,
    JobError,
    JobFailed,
    JobStalled,
    JobTimedOut,
)
from kubeml.training.launchers._contract import JobOutcome

__all__ = [
    "JobApiError",
    "JobState",
    "RBAC_RULES",
    "cancel_on_sigterm",
    "job_state",
    "run_job",
    "server_dry_run",
    "spec_hash",
]

log = logging.getLogger("kubeml.training.launch")

RUN_ID_ANNOTATION = "kubeml.io/run-id"
SPEC_HASH_ANNOTATION = "kubeml.io/spec-sha256"

#: What the identity that runs the train step needs (a KFP pipeline runner's service account):
#: create, read and delete its jobs. No list/watch/patch: the waiter polls one object by name.
RBAC_RULES: tuple[dict[str, list[str]], ...] = (
    {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get", "delete"]},
    {"apiGroups": ["sagemaker.services.k8s.aws"], "resources": ["trainingjobs"], "verbs": ["create", "get", "delete"]},
    # Diagnosis only (a stalled Ray pod's cause, a failed job's log tail); without them the
    # wait still works, from the job's status alone.
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
    {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
)
#: Lines of the failed job's log quoted in its error (the end of a Ray traceback).
LOG_TAIL_LINES = 40

#: RayJob ``jobDeploymentStatus`` values after which KubeRay changes nothing (``Retrying`` is
#: a failed attempt KubeRay will run again within ``backoffLimit``: not the end).
RAY_DONE_DEPLOYMENT = frozenset({"Complete", "Failed", "ValidationFailed"})
#: Ray ``JobStatus`` values of a finished job (used when an old KubeRay sets no deployment status).
RAY_DONE_JOB = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
#: SageMaker ``TrainingJobStatus`` values of a finished job (``Stopping`` is still going).
SAGEMAKER_DONE = frozenset({"Completed", "Failed", "Stopped"})
#: HTTP statuses worth retrying while waiting: the apiserver restarting or throttling.
_TRANSIENT_HTTP = frozenset({429, 500, 502, 503, 504})
#: RayJob deployment states in which the Ray cluster is still being brought up.
RAY_STARTING = frozenset({"", "New", "Initializing", "Waiting"})
#: Seconds a RayJob may stay in :data:`RAY_STARTING` before it is reported stalled: long enough
#: for an autoscaler (Karpenter, cluster-autoscaler) to add GPU nodes and pull a large image.
DEFAULT_STALL_S = 1800.0
#: Seconds a container may fail to get its image before the job is reported stalled (a
#: registry blip recovers within the kubelet's first back-offs).
DEFAULT_IMAGE_GRACE_S = 120.0
#: Container waiting reasons that mean "this image will not start" rather than "starting".
IMAGE_ERRORS = frozenset({"ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull", "InvalidImageName",
                          "CreateContainerConfigError", "CreateContainerError"})
#: Longest a status message is quoted in a log line (a Ray traceback can be many KB).
MESSAGE_MAX_CHARS = 2000


@dataclass(frozen=True)
class JobState:
    """A job's status, read from its object."""

    text: str
    """Short status, e.g. ``Running / RUNNING`` (RayJob) or ``InProgress / Training`` (TrainingJob)."""
    done: bool
    succeeded: bool
    message: str = ""
    """The controller's message (failure reason, or why it is not progressing); may be empty."""

    def line(self) -> str:
        msg = self.message if len(self.message) <= MESSAGE_MAX_CHARS else self.message[:MESSAGE_MAX_CHARS] + "..."
        return f"{self.text}: {msg}" if msg else self.text


# ------------------------------------------------------------------ status


def job_state(obj: dict[str, Any]) -> JobState:
    """The state of a RayJob or ACK TrainingJob object (as returned by the API)."""
    st = obj.get("status") or {}
    kind = obj.get("kind")
    if kind == "TrainingJob":
        return _training_job_state(st)
    if kind == "RayJob":
        return _rayjob_state(st)
    raise ValueError(f"cannot follow a {kind!r}; supported kinds: RayJob, TrainingJob")


def _rayjob_state(st: dict[str, Any]) -> JobState:
    dep, job = st.get("jobDeploymentStatus") or "", st.get("jobStatus") or ""
    text = " / ".join(x for x in (dep, job) if x) or "Pending"
    done = dep in RAY_DONE_DEPLOYMENT or (not dep and job in RAY_DONE_JOB)
    message = " ".join(x for x in (f"[{st['reason']}]" if st.get("reason") else "", st.get("message") or "") if x)
    return JobState(text, done, done and job == "SUCCEEDED", message)


def _training_job_state(st: dict[str, Any]) -> JobState:
    status, secondary = st.get("trainingJobStatus") or "", st.get("secondaryStatus") or ""
    conditions = {c.get("type"): c for c in st.get("conditions") or [] if isinstance(c, dict)}
    terminal = conditions.get("ACK.Terminal")
    if terminal and terminal.get("status") == "True" and status not in SAGEMAKER_DONE:
        # The controller gave up before or while creating the job (e.g. an invalid spec).
        return JobState(f"{status or 'Pending'} / ACK.Terminal", True, False, terminal.get("message") or "")
    text = " / ".join(x for x in (status, secondary) if x) or "Pending"
    message = st.get("failureReason") or ""
    if not message:
        # Why it is not progressing: a recoverable AWS error, or not yet synced with AWS.
        for ctype, bad in (("ACK.Recoverable", "True"), ("ACK.ResourceSynced", "False")):
            c = conditions.get(ctype)
            if c and c.get("status") == bad and c.get("message"):
                message = f"{ctype}: {c['message']}"
                break
    done = status in SAGEMAKER_DONE
    return JobState(text, done, status == "Completed", message)


def spec_hash(manifest: dict[str, Any]) -> str:
    """SHA-256 of the manifest's spec (canonical JSON): same spec, same hash."""
    return hashlib.sha256(json.dumps(manifest.get("spec"), sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------ Kubernetes API


@dataclass(frozen=True)
class _Ref:
    group: str
    version: str
    plural: str
    kind: str
    name: str
    namespace: str

    @classmethod
    def of(cls, manifest: dict[str, Any], namespace: str | None) -> _Ref:
        group, version = manifest["apiVersion"].split("/")
        ns = namespace or manifest["metadata"].get("namespace")
        if not ns:
            raise ConfigError(f"{manifest['kind']} {manifest['metadata']['name']}: no namespace given")
        return cls(group, version, manifest["kind"].lower() + "s", manifest["kind"], manifest["metadata"]["name"], ns)

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"

    def kubectl(self, verb: str) -> str:
        return f"kubectl -n {self.namespace} {verb} {self.plural}.{self.group} {self.name}"


def server_dry_run(manifest: dict[str, Any], *, namespace: str, api_client: Any | None = None) -> dict[str, Any]:
    """Ask the apiserver to validate ``manifest`` against the CRD schema without storing it."""
    ref = _Ref.of(manifest, namespace)
    return custom_objects_api(api_client).create_namespaced_custom_object(
        ref.group, ref.version, ref.namespace, ref.plural, manifest, dry_run="All")


def _api_error(ref: _Ref, action: str, exc: Any) -> JobApiError:
    status = getattr(exc, "status", None)
    if status in (401, 403):
        verbs = ", ".join(RBAC_RULES[0 if ref.group == "ray.io" else 1]["verbs"])
        return JobApiError(f"not allowed to {action} {ref} ({status}); the step's identity needs {verbs} on "
                           f"{ref.plural}.{ref.group} in namespace {ref.namespace} "
                           "(see kubeml.training.launchers.RBAC_RULES)", status)
    body = getattr(exc, "body", None) or exc
    return JobApiError(f"{action} {ref} failed ({status}): {body}", status)


def _transient(exc: BaseException) -> bool:
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    if isinstance(exc, ApiException):
        return exc.status in _TRANSIENT_HTTP or exc.status == 0
    return isinstance(exc, (HTTPError, ConnectionError, TimeoutError))


def _get(api, ref: _Ref) -> dict[str, Any]:
    return api.get_namespaced_custom_object(ref.group, ref.version, ref.namespace, ref.plural, ref.name)


def _delete(api, ref: _Ref, *, wait_s: float) -> None:
    """Delete the job and, with ``wait_s`` > 0, wait until it is gone (finalizers ran)."""
    from kubernetes.client.exceptions import ApiException

    try:
        # Background: the apiserver's garbage collector removes what the job owns (the Ray cluster).
        api.delete_namespaced_custom_object(ref.group, ref.version, ref.namespace, ref.plural, ref.name,
                                            propagation_policy="Background")
    except ApiException as exc:
        if exc.status != 404:
            raise _api_error(ref, "delete", exc) from exc
        return
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            _get(api, ref)
        except ApiException as exc:
            if exc.status == 404:
                return
            raise _api_error(ref, "read", exc) from exc
        time.sleep(0.2)
    if wait_s > 0:
        raise JobError(f"{ref} is still being deleted after {wait_s:.0f} s (a finalizer of its controller?); "
                       f"check it with: {ref.kubectl('get')} -o yaml")


def _submit(api, manifest: dict[str, Any], ref: _Ref, *, replace_failed: bool,
            delete_wait_s: float) -> tuple[dict[str, Any], bool, bool]:
    """Create the job or adopt the existing one; returns ``(object, adopted, replaced)``."""
    from kubernetes.client.exceptions import ApiException

    digest = spec_hash(manifest)
    meta = manifest["metadata"]
    run_id = (meta.get("annotations") or {}).get(RUN_ID_ANNOTATION)
    body = {**manifest, "metadata": {**meta, "namespace": ref.namespace,
                                     "annotations": {**(meta.get("annotations") or {}), SPEC_HASH_ANNOTATION: digest}}}

    def create() -> dict[str, Any]:
        return api.create_namespaced_custom_object(ref.group, ref.version, ref.namespace, ref.plural, body)

    try:
        return create(), False, False
    except ApiException as exc:
        if exc.status != 409:
            raise _api_error(ref, "create", exc) from exc
    try:
        existing = _get(api, ref)
    except ApiException as exc:
        raise _api_error(ref, "read", exc) from exc
    ann = (existing.get("metadata") or {}).get("annotations") or {}
    if run_id is not None and ann.get(RUN_ID_ANNOTATION) != run_id:
        owner = ann.get(RUN_ID_ANNOTATION)
        raise JobConflict(f"{ref} exists but belongs to {f'run {owner}' if owner else 'no kubeml run'}, not run {run_id}; "
                          f"delete it ({ref.kubectl('delete')}) or use another run id")
    state = job_state(existing)
    if state.done and not state.succeeded and replace_failed:
        log.warning("%s exists and ended %s; deleting it and creating it again", ref, state.line())
        _delete(api, ref, wait_s=delete_wait_s)
        try:
            return create(), False, True
        except ApiException as exc:
            raise _api_error(ref, "create", exc) from exc
    if ann.get(SPEC_HASH_ANNOTATION) != digest:
        raise JobConflict(f"{ref} exists for this run but was built from another configuration ({state.text}); "
                          f"wait for it or delete it ({ref.kubectl('delete')}) before submitting a changed job")
    log.info("%s exists (%s): following it", ref, state.text)
    return existing, True, False


def run_job(
    manifest: dict[str, Any],
    *,
    namespace: str | None = None,
    timeout_s: float = 24 * 3600.0,
    poll_s: float = 10.0,
    on_status: Callable[[str], None] | None = None,
    stop: threading.Event | None = None,
    replace_failed: bool = True,
    delete_on_cancel: bool = True,
    api_client: Any | None = None,
    stall_s: float = DEFAULT_STALL_S,
    image_grace_s: float = DEFAULT_IMAGE_GRACE_S,
) -> JobOutcome:
    """Create (or adopt) the RayJob / TrainingJob ``manifest`` and wait until it has finished.

    Args:
        namespace: where the job goes (default: the manifest's ``metadata.namespace``).
        timeout_s: seconds to wait for a terminal status before :class:`JobTimedOut`
            (the job keeps running). Counted from the call.
        poll_s: seconds between two status reads; a read is one small GET.
        on_status: called with each new status line (``text`` or ``text: message``).
        stop: set it to cancel: the job is deleted (``delete_on_cancel``) and
            :class:`JobCancelled` raised.
        replace_failed: an existing job of this run that failed is deleted and created again
            (False: follow it, i.e. report its failure).
        stall_s: seconds a RayJob's Ray cluster may take to come up before
            :class:`JobStalled` (see the module docstring, step 7).
        image_grace_s: seconds a Ray pod's container may fail to get its image.
    Returns the :class:`JobOutcome`; raises :class:`JobFailed`, :class:`JobTimedOut`,
    :class:`JobCancelled`, :class:`JobConflict` or :class:`JobError` (API errors).
    """
    if timeout_s <= 0 or poll_s <= 0 or stall_s <= 0 or image_grace_s <= 0:
        raise ConfigError(f"timeout_s, poll_s, stall_s and image_grace_s must be > 0 "
                          f"(got {timeout_s}, {poll_s}, {stall_s}, {image_grace_s})")
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    ref = _Ref.of(manifest, namespace)
    api = custom_objects_api(api_client)
    stop = stop or threading.Event()
    obj, adopted, replaced = _submit(api, manifest, ref, replace_failed=replace_failed,
                                     delete_wait_s=min(120.0, timeout_s))
    if not adopted:
        log.info("created %s", ref)
    transitions: list[str] = []
    watch = _StallWatch(ref, api_client, stall_s=stall_s, image_grace_s=image_grace_s) if ref.kind == "RayJob" else None
    while True:
        state = job_state(obj) if obj is not None else None
        if state is not None:
            line = state.line()
            if not transitions or transitions[-1] != line:
                transitions.append(line)
                log.info("%s: %s", ref, line)
                if on_status:
                    on_status(line)
            if state.done:
                if not state.succeeded:
                    tail = _log_tail(ref, api_client) if ref.kind == "RayJob" else ""
                    raise JobFailed(f"{ref} ended {state.text}: {state.message or 'its status gives no message'}; "
                                    f"details: {ref.kubectl('describe')}"
                                    + (f"\n--- the end of its log (kubectl logs -n {ref.namespace} job/{ref.name}) ---\n"
                                       f"{tail}" if tail else ""), state.message)
                artifacts = ((obj.get("status") or {}).get("modelArtifacts") or {}).get("s3ModelArtifacts", "")
                return JobOutcome(ref.kind, ref.name, ref.namespace, state.text, tuple(transitions), adopted, replaced,
                                  artifacts, time.monotonic() - t0)
            if watch is not None:
                watch.check(obj)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            last = transitions[-1] if transitions else "unknown (status unreadable)"
            raise JobTimedOut(f"{ref} still {last} after {timeout_s:.0f} s; it keeps running (a retry follows it): "
                              f"{ref.kubectl('get')}, or stop it with {ref.kubectl('delete')}")
        if stop.wait(min(poll_s, remaining)):
            if delete_on_cancel:
                log.warning("cancelled: deleting %s", ref)
                _delete(api, ref, wait_s=0)
            raise JobCancelled(f"waiting for {ref} was cancelled; " + ("the job was deleted" if delete_on_cancel
                                                                        else "the job keeps running"))
        obj = _read(api, ref)


def _log_tail(ref: _Ref, api_client: Any | None, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a RayJob's log: KubeRay's submitter pod (the Kubernetes Job
    named after the RayJob) follows the Ray job's driver output, traceback included. Empty
    when it cannot be read (no submitter pod, no right to read logs): the status still says why.
    """
    from kubernetes.client import CoreV1Api

    from kubeml._kube import api_client as load_client

    try:
        core = CoreV1Api(api_client or load_client())
        pods = core.list_namespaced_pod(ref.namespace, label_selector=f"batch.kubernetes.io/job-name={ref.name}").items
        if not pods:
            return ""
        newest = max(pods, key=lambda pod: pod.metadata.creation_timestamp)
        # Not preloaded: the client would turn a log that happens to be one JSON document
        # into a Python repr.
        response = core.read_namespaced_pod_log(newest.metadata.name, ref.namespace, tail_lines=lines,
                                                _preload_content=False)
        text = response.data.decode("utf-8", "replace")
    except Exception as exc:  # noqa: BLE001 - the log is a courtesy; the failure is reported anyway
        log.info("could not read the log of %s: %s", ref, getattr(exc, "status", None) or exc)
        return ""
    return text[-MESSAGE_MAX_CHARS * 4:].rstrip()


class _StallWatch:
    """Tells a RayJob that is coming up from one that never will (module docstring, step 7)."""

    def __init__(self, ref: _Ref, api_client: Any | None, *, stall_s: float, image_grace_s: float):
        self.ref, self.api_client = ref, api_client
        self.stall_s, self.image_grace_s = stall_s, image_grace_s
        self.starting_since: float | None = None
        self.image_errors: dict[tuple[str, str], float] = {}
        """(pod, container) -> when its image error was first seen."""
        self.can_list_pods = True

    def check(self, obj: dict[str, Any]) -> None:
        st = obj.get("status") or {}
        now = time.monotonic()
        if (st.get("jobDeploymentStatus") or "") not in RAY_STARTING:
            self.starting_since = None
            self.image_errors.clear()
            return
        if self.starting_since is None:
            self.starting_since = now
        pods = self._pods(st)
        for cause, pod, container in _image_problems(pods):
            first = self.image_errors.setdefault((pod, container), now)
            if now - first >= self.image_grace_s:
                raise JobStalled(f"{self.ref} is stalled: pod {pod} cannot start container {container}: {cause}; "
                                 f"fix the image (training.launcher.image) and run again; details: "
                                 f"kubectl -n {self.ref.namespace} describe pod {pod}")
        if now - self.starting_since < self.stall_s:
            return
        cause = _scheduling_problem(pods) or _head_problem(pods) or _cluster_conditions(st)
        raise JobStalled(f"{self.ref} is stalled: its Ray cluster is not running after {self.stall_s:.0f} s "
                         f"({st.get('jobDeploymentStatus') or 'no status yet'}): "
                         f"{cause or 'no cause reported (is the KubeRay operator running?)'}; "
                         f"details: {self.ref.kubectl('describe')}")

    def _pods(self, st: dict[str, Any]) -> list[Any]:
        cluster = st.get("rayClusterName")
        if not cluster or not self.can_list_pods:
            return []
        from kubernetes.client import CoreV1Api
        from kubernetes.client.exceptions import ApiException

        from kubeml._kube import api_client as load_client

        try:
            core = CoreV1Api(self.api_client or load_client())
            return core.list_namespaced_pod(self.ref.namespace, label_selector=f"ray.io/cluster={cluster}").items
        except ApiException as exc:
            if exc.status in (401, 403):
                log.info("may not list pods in %s (%s): stall causes come from the RayJob status only",
                         self.ref.namespace, exc.status)
                self.can_list_pods = False
            return []
        except Exception as exc:  # noqa: BLE001 - a failed diagnosis must not fail the wait
            log.debug("listing the Ray pods of %s failed: %s", self.ref, exc)
            return []


def _image_problems(pods: list[Any]) -> list[tuple[str, str, str]]:
    problems = []
    for pod in pods:
        statuses = [*(pod.status.init_container_statuses or []), *(pod.status.container_statuses or [])]
        for status in statuses:
            waiting = status.state.waiting if status.state else None
            if waiting and waiting.reason in IMAGE_ERRORS:
                problems.append((f"{waiting.reason}: {waiting.message or status.image}", pod.metadata.name,
                                 status.name))
    return problems


def _scheduling_problem(pods: list[Any]) -> str:
    for pod in pods:
        for condition in pod.status.conditions or []:
            if condition.type == "PodScheduled" and condition.status == "False":
                return f"pod {pod.metadata.name} cannot be scheduled ({condition.reason}): {condition.message}"
    return ""


def _head_problem(pods: list[Any]) -> str:
    for pod in pods:
        if (pod.metadata.labels or {}).get("ray.io/node-type") != "head":
            continue
        for status in pod.status.container_statuses or []:
            waiting = status.state.waiting if status.state else None
            if waiting and waiting.reason:
                return (f"head pod {pod.metadata.name}: {waiting.reason}: {waiting.message or ''} "
                        f"(restarts: {status.restart_count})").strip()
            if not status.ready:
                return f"head pod {pod.metadata.name} is {pod.status.phase} but never Ready"
    return ""


def _cluster_conditions(st: dict[str, Any]) -> str:
    conditions = (st.get("rayClusterStatus") or {}).get("conditions") or []
    failing = [f"{c.get('type')}={c.get('status')} ({c.get('reason')}): {c.get('message', '')}".strip()
               for c in conditions if c.get("status") != "True"]
    return "; ".join(failing)


def _read(api, ref: _Ref) -> dict[str, Any] | None:
    """The job object, or None after a transient API error (logged)."""
    from kubernetes.client.exceptions import ApiException

    try:
        return _get(api, ref)
    except Exception as exc:  # noqa: BLE001 - sorted into transient / fatal below
        if isinstance(exc, ApiException) and exc.status == 404:
            raise JobFailed(f"{ref} was deleted while kubeml waited for it (by someone else, or by its TTL)") from None
        if _transient(exc):
            log.warning("reading %s failed (%s); retrying", ref, getattr(exc, "status", None) or exc)
            return None
        if isinstance(exc, ApiException):
            raise _api_error(ref, "read", exc) from exc
        raise


@contextlib.contextmanager
def cancel_on_sigterm() -> Iterator[threading.Event]:
    """Yield an event that SIGTERM sets, for :func:`run_job`'s ``stop``.

    KFP terminates a cancelled step's pod with SIGTERM; the default action would kill the
    waiter and leave the job running with nobody waiting for it. Outside the main thread
    (where Python cannot install handlers) the event is simply never set by a signal.
    """
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda signum, frame: event.set())
    try:
        yield event
    finally:
        signal.signal(signal.SIGTERM, previous)
