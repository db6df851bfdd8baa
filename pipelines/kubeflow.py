"""Kubeflow Pipelines as a target: compile the training pipeline, submit it with ``kfp.Client``,
follow the run to its end, and schedule recurring runs.

The pipeline is the one ``kfp.local`` runs (:mod:`kubeml.pipelines.training`), compiled to
KFP v2 IR. Its stages write the same run ledger to the environment's artifact store on a
cluster as locally, so ``kubeml run --target kubeflow`` shows progress and picks its exit
code from the ledger exactly as a local run does; the KFP run's own state says when it is over.

Everything a submission needs is checked before the one call that creates the run, and a
failed check leaves nothing on the server:

1. the environment can run on a cluster (an ``s3://`` artifact store, a registry server
   rather than a SQLite file each pod would have to itself);
2. the pipeline compiles;
3. the host answers as the KFP API (not a login page) and accepts the credentials;
4. the experiment exists (or ``create_experiment`` says to make it);
5. the pipeline root is an object store the cluster can write, and its bucket exists.

Credentials: a bearer token, Kubeflow's OIDC session cookie, or, inside a pod, the projected
service-account token (:class:`~kubeml.config.KubeflowConfig`).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kubeml._files import atomic_write_text, read_reference
from kubeml.config import EnvironmentConfig, KubeflowConfig
from kubeml.errors import ConfigError, KfpAuthError, KfpUnreachable, PipelineCompileError, PipelineError

__all__ = [
    "IN_CLUSTER_HOST",
    "TERMINAL_STATES",
    "KfpSession",
    "Schedule",
    "Submission",
    "check_cluster_ready",
    "compile_pipeline",
    "connect",
    "failure_details",
    "follow",
    "normalize_cron",
    "pipeline_root",
    "run_parameters",
    "schedule",
    "submit",
]

#: The KFP API inside the cluster (the ``ml-pipeline`` Service of a standard install).
IN_CLUSTER_HOST = "http://ml-pipeline.kubeflow.svc.cluster.local:8888"
#: Run states after which nothing more happens.
TERMINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "SKIPPED", "CANCELED"})
#: Object stores a KFP launcher writes artifacts to.
_ROOT_SCHEMES = ("s3", "gs", "minio")
_IMAGE_REF = re.compile(r"^[a-z0-9][a-z0-9._/:-]*[a-z0-9](:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}|@sha256:[0-9a-f]{64})$")
#: How long a followed run may be unreadable (API down, network blip) before giving up.
_FOLLOW_OUTAGE_S = 300.0


# ----------------------------------------------------------------------------- compile


def compile_pipeline(output: str | Path, image: str | None = None, kubeflow: KubeflowConfig | None = None) -> Path:
    """Compile the training pipeline to KFP v2 IR YAML at ``output``.

    ``image`` replaces the image of every step that runs the kubeml component image;
    ``kubeflow.tasks`` gives each step's pod its resources and placement (None: none).
    Raises :class:`ConfigError` for a bad ``image`` or ``output`` and
    :class:`PipelineCompileError` when the definition does not compile.
    """
    import yaml
    from kfp import compiler

    from kubeml.components import IMAGE
    from kubeml.pipelines import training

    output = Path(output)
    if output.is_dir():
        raise ConfigError(f"{output} is a directory; give a file path")
    if image is not None and not _IMAGE_REF.fullmatch(image):
        raise ConfigError(f"--image {image!r} is not an image reference (registry/name:tag or name@sha256:...)")
    with tempfile.TemporaryDirectory() as tmp:
        compiled = Path(tmp) / "pipeline.yaml"
        try:
            pipeline = training.build_training_pipeline(kubeflow) if kubeflow is not None else training.training_pipeline
            compiler.Compiler().compile(pipeline, str(compiled))
        except Exception as exc:  # noqa: BLE001 - the compiler raises many types; the user needs the cause
            raise PipelineCompileError(f"the pipeline {training.PIPELINE_NAME!r} does not compile: "
                                       f"{type(exc).__name__}: {exc}") from exc
        docs = list(yaml.safe_load_all(compiled.read_text()))
    replaced = 0
    for doc in docs:
        executors = ((doc or {}).get("deploymentSpec") or {}).get("executors") or {}
        for executor in executors.values():
            container = executor.get("container") or {}
            if image is not None and container.get("image") == IMAGE:
                container["image"] = image
                replaced += 1
    if image is not None and not replaced:
        raise ConfigError(f"no step of the compiled pipeline runs in {IMAGE}; nothing to replace")
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output, yaml.safe_dump_all(docs, sort_keys=False))
    return output


# ----------------------------------------------------------------------------- connect


@dataclass
class KfpSession:
    """A checked connection to a KFP API: the ``kfp.Client`` and what it was made from."""

    client: Any
    config: KubeflowConfig
    host: str
    multi_user: bool

    @property
    def ui(self) -> str:
        return self.config.ui_host or self.host

    def run_url(self, run_id: str) -> str:
        return f"{self.ui}/#/runs/details/{run_id}"

    def call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` with the API's failures turned into kubeml errors naming ``what``."""
        import kfp_server_api
        import urllib3

        kwargs.setdefault("_request_timeout", (min(10.0, self.config.request_timeout_s), self.config.request_timeout_s))
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                return fn(*args, **kwargs)
        except kfp_server_api.ApiException as exc:
            raise _api_error(what, self.host, self.config, exc.status, exc.reason, exc.body) from None
        except urllib3.exceptions.HTTPError as exc:
            raise KfpUnreachable(f"{what}: no answer from the KFP API at {self.host}: {_reason(exc)}") from None


def connect(kf: KubeflowConfig) -> KfpSession:
    """Check that ``kf.host`` is the KFP API and takes the credentials; return a session on it.

    Raises :class:`ConfigError` (no host, a credential that cannot be read),
    :class:`KfpUnreachable` and :class:`KfpAuthError`.
    """
    host = kf.host
    if host is None:
        if kf.auth != "service-account":
            raise ConfigError("kubeflow.host is not set: give the KFP API's URL (https://<kubeflow>/pipeline, "
                              "or http://127.0.0.1:8888 through `kubectl port-forward -n kubeflow svc/ml-pipeline "
                              "8888`); only a pod with auth: service-account finds it by itself")
        host = IN_CLUSTER_HOST
    token = cookie = None
    credentials = None
    if kf.auth == "token":
        token = read_reference(kf.token or "", "kubeflow.token").decode().strip()
        if not token:
            raise ConfigError(f"kubeflow.token {kf.token!r} is empty")
    elif kf.auth == "cookie":
        cookie = read_reference(kf.cookie or "", "kubeflow.cookie").decode().strip()
        if not re.fullmatch(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+=[^\s;]+(;\s*[!#$%&'*+\-.^_`|~0-9A-Za-z]+=[^\s;]+)*", cookie):
            raise ConfigError(f"kubeflow.cookie {kf.cookie!r} is not a cookie NAME=VALUE (e.g. authservice_session=...)")
    elif kf.auth == "service-account":
        path = Path(kf.service_account_token_path)
        try:
            if not path.read_text().strip():
                raise OSError("the file is empty")
        except OSError as exc:
            raise ConfigError(f"kubeflow.service_account_token_path {path}: {getattr(exc, 'strerror', None) or exc}; "
                              "mount a projected serviceAccountToken volume with audience pipelines.kubeflow.org "
                              "there (Kubeflow's PodDefault access-ml-pipeline does)") from None
        from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

        credentials = ServiceAccountTokenVolumeCredentials(path=str(path))
        token = path.read_text().strip()
    multi_user = _probe(host, kf, token=token, cookie=cookie)

    import kfp

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore", FutureWarning)
        client = kfp.Client(host=host, existing_token=None if credentials else token, cookies=cookie,
                            credentials=credentials, ssl_ca_cert=kf.ca_cert, verify_ssl=kf.verify_tls,
                            ui_host=kf.ui_host or host, namespace=kf.namespace or "kubeflow")
    return KfpSession(client=client, config=kf, host=host, multi_user=multi_user)


def _probe(host: str, kf: KubeflowConfig, *, token: str | None, cookie: str | None) -> bool:
    """GET the healthz endpoint without following redirects; whether the install is multi-user.

    A gateway that wants a login answers with a redirect or an HTML page: that is an
    authentication problem, reported as one, not a JSON error.
    """
    import urllib3

    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if cookie:
        headers["Cookie"] = cookie
    pool = urllib3.PoolManager(cert_reqs="CERT_REQUIRED" if kf.verify_tls else "CERT_NONE", ca_certs=kf.ca_cert,
                               retries=urllib3.Retry(total=2, connect=2, read=0, redirect=0, backoff_factor=0.5,
                                                     raise_on_redirect=False))
    url = f"{host}/apis/v2beta1/healthz"
    try:
        response = pool.request("GET", url, headers=headers, redirect=False,
                                timeout=urllib3.Timeout(connect=min(10.0, kf.request_timeout_s), read=kf.request_timeout_s))
    except urllib3.exceptions.HTTPError as exc:
        raise KfpUnreachable(f"no answer from the KFP API at {host}: {_reason(exc)}; check kubeflow.host "
                             "(and the port-forward, if you use one)") from None
    finally:
        pool.clear()
    if response.status in (301, 302, 303, 307, 308):
        raise KfpAuthError(f"the KFP API at {host} redirected to {response.headers.get('Location', '?')} "
                           f"(a login page): {_auth_hint(kf)}")
    if response.status in (401, 403):
        raise _api_error("checking the KFP API", host, kf, response.status, response.reason, response.data)
    if response.status == 404:
        raise ConfigError(f"{url} is not found (404): kubeflow.host must be the KFP API's base URL, "
                          "e.g. https://<kubeflow>/pipeline")
    if response.status >= 400:
        raise _api_error("checking the KFP API", host, kf, response.status, response.reason, response.data)
    try:
        body = json.loads(response.data)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        kind = response.headers.get("Content-Type", "no content type")
        raise KfpAuthError(f"{host} answered {response.status} with {kind}, not the KFP API's JSON: a login page or "
                           f"another service; {_auth_hint(kf)}")
    return bool(body.get("multi_user"))


def _auth_hint(kf: KubeflowConfig) -> str:
    return {
        "none": "this host needs credentials: set kubeflow.auth to token, cookie or service-account",
        "token": f"check the bearer token ({kf.token}): it may be expired or for another audience",
        "cookie": f"the session cookie ({kf.cookie}) is missing or expired: log in to the dashboard again and "
                  "copy the authservice_session (or _oauth2_proxy) cookie",
        "service-account": "the pod's service account token was refused: its audience must be pipelines.kubeflow.org "
                           "and the service account needs access to the profile namespace",
    }[kf.auth]


def _api_error(what: str, host: str, kf: KubeflowConfig, status: int | None, reason: Any, body: Any) -> PipelineError:
    if not status:
        # kfp_server_api reports TLS failures as status 0.
        return KfpUnreachable(f"{what}: no usable answer from the KFP API at {host}: {reason}")
    message = _server_message(body)
    detail = f"{status} {reason or ''}".strip() + (f": {message}" if message else "")
    if status in (401, 403):
        who = f" in namespace {kf.namespace}" if kf.namespace and status == 403 else ""
        return KfpAuthError(f"{what}: the KFP API at {host} refused the request{who} ({detail}); {_auth_hint(kf)}")
    error = PipelineError(f"{what}: the KFP API at {host} answered {detail}")
    if status is not None and 400 <= status < 500 and status != 429:
        error.retryable = False  # type: ignore[misc]
    return error


def _server_message(body: Any) -> str:
    if isinstance(body, bytes):
        body = body.decode(errors="replace")
    if not body:
        return ""
    try:
        data = json.loads(body)
    except (TypeError, ValueError):
        return str(body).strip()[:300]
    if isinstance(data, dict):
        return str(data.get("message") or data.get("error") or data)[:300]
    return str(data)[:300]


def _reason(exc: BaseException) -> str:
    inner = getattr(exc, "reason", None)
    return str(inner or exc)


# ----------------------------------------------------------------------------- submit


@dataclass(frozen=True)
class Submission:
    """A created KFP run."""

    kfp_run_id: str
    run_id: str
    """The kubeml run id: the run ledger's key in the artifact store."""
    run_name: str
    experiment: str
    experiment_id: str
    namespace: str | None
    pipeline_root: str
    url: str


@dataclass(frozen=True)
class Schedule:
    """A created KFP recurring run."""

    recurring_run_id: str
    name: str
    cron: str
    experiment: str
    experiment_id: str
    namespace: str | None
    url: str


def check_cluster_ready(cfg: EnvironmentConfig) -> None:
    """Refuse an environment whose state the cluster's pods could not share."""
    if not cfg.artifact_store.uri.startswith("s3://"):
        raise ConfigError(f"environments.{cfg.name}.artifact_store.uri is {cfg.artifact_store.uri}: the pipeline's pods "
                          "cannot see a local store; give an s3:// URI")
    if cfg.registry.tracking_uri.startswith("sqlite:") or cfg.registry.tracking_uri.startswith("file:"):
        raise ConfigError(f"environments.{cfg.name}.registry.tracking_uri is {cfg.registry.tracking_uri}: each pipeline "
                          "pod would have its own empty registry; point it at the MLflow tracking server "
                          "(http://mlflow.kubeml-system.svc:5000 in the platform chart)")


def pipeline_root(cfg: EnvironmentConfig) -> str:
    """The pipeline root of ``cfg``'s runs, checked to be an object store (see the module docstring)."""
    root = cfg.kubeflow.pipeline_root
    if root is None:
        if not cfg.artifact_store.uri.startswith("s3://"):
            raise ConfigError(f"environments.{cfg.name}.kubeflow.pipeline_root is not set and the artifact store is "
                              "local: give an s3:// pipeline root the cluster can write")
        root = cfg.artifact_store.uri.rstrip("/") + "/pipeline-root"
    parts = urlsplit(root)
    if parts.scheme not in _ROOT_SCHEMES or not parts.netloc:
        raise ConfigError(f"environments.{cfg.name}.kubeflow.pipeline_root {root!r} is not storage the cluster can "
                          f"write: give {' or '.join(s + '://BUCKET/PREFIX' for s in _ROOT_SCHEMES)}")
    if parts.scheme == "s3":
        _check_bucket(parts.netloc, root, cfg)
    return root


def _check_bucket(bucket: str, root: str, cfg: EnvironmentConfig) -> None:
    """The bucket must exist; what this machine's credentials may not see is left to the cluster."""
    import boto3
    import botocore.exceptions

    try:
        boto3.client("s3", endpoint_url=cfg.artifact_store.endpoint_url).head_bucket(Bucket=bucket)
    except botocore.exceptions.ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise ConfigError(f"pipeline root {root}: bucket {bucket} does not exist; create it or set "
                              f"environments.{cfg.name}.kubeflow.pipeline_root") from None
        # 403: this machine may not look; the run's service account may still write.
    except (botocore.exceptions.NoCredentialsError, botocore.exceptions.EndpointConnectionError):
        pass


def _experiment(session: KfpSession, *, create: bool) -> Any:
    kf = session.config
    name, namespace = kf.experiment, kf.namespace
    predicate = json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})
    api = session.client._experiment_api  # noqa: SLF001 - kfp.Client's own API object, with its auth
    kwargs: dict[str, Any] = {"filter": predicate}
    if namespace:
        kwargs["namespace"] = namespace
    found = session.call(f"looking up experiment {name!r}", api.experiment_service_list_experiments, **kwargs)
    if found.experiments:
        return found.experiments[0]
    where = f"namespace {namespace}" if namespace else session.host
    if not create:
        listed = session.call("listing experiments", api.experiment_service_list_experiments, page_size=20,
                              **({"namespace": namespace} if namespace else {}))
        names = sorted(e.display_name for e in listed.experiments or [])
        raise ConfigError(f"experiment {name!r} does not exist in {where}; there are: "
                          f"{', '.join(names) if names else 'none'}. Create it, pass --create-experiment, or set "
                          "kubeflow.create_experiment: true")
    import kfp_server_api

    body = kfp_server_api.V2beta1Experiment(display_name=name, namespace=namespace,
                                            description="kubeml training pipeline runs")
    return session.call(f"creating experiment {name!r}", api.experiment_service_create_experiment, experiment=body)


def _prepare(cfg: EnvironmentConfig, image: str | None, workdir: Path) -> tuple[Path, str]:
    check_cluster_ready(cfg)
    package = compile_pipeline(workdir / "pipeline.yaml", image=image, kubeflow=cfg.kubeflow)
    return package, pipeline_root(cfg)


def _job_config(session: KfpSession, package: Path, params: dict[str, Any], root: str) -> Any:
    """kfp.Client's own assembly of the spec and runtime config (its caching options included)."""
    return session.client._create_job_config(  # noqa: SLF001 - the assembly kfp.Client uses for run_pipeline
        params=params, pipeline_package_path=str(package), pipeline_id=None, version_id=None,
        enable_caching=None, cache_key=None, pipeline_root=root)


def submit(cfg: EnvironmentConfig, *, run_id: str, code_version: str, run_name: str | None = None,
           image: str | None = None, session: KfpSession | None = None) -> Submission:
    """Compile, check and submit one run of the training pipeline; return it without waiting."""
    import kfp_server_api

    kf = cfg.kubeflow
    with tempfile.TemporaryDirectory() as tmp:
        package, root = _prepare(cfg, image, Path(tmp))
        session = session or connect(kf)
        experiment = _experiment(session, create=kf.create_experiment)
        params = {"config_json": cfg.model_dump_json(), "run_id": run_id, "code_version": code_version}
        job = _job_config(session, package, params, root)
    body = kfp_server_api.V2beta1Run(experiment_id=experiment.experiment_id, display_name=run_name or run_id,
                                     pipeline_spec=job.pipeline_spec, runtime_config=job.runtime_config,
                                     service_account=kf.service_account)
    run = session.call("creating the run", session.client._run_api.run_service_create_run,  # noqa: SLF001
                       run=body)
    return Submission(kfp_run_id=run.run_id, run_id=run_id, run_name=run_name or run_id,
                      experiment=kf.experiment, experiment_id=experiment.experiment_id, namespace=kf.namespace,
                      pipeline_root=root, url=session.run_url(run.run_id))


#: Filled in by KFP's scheduler for each run it starts: every scheduled run gets its own
#: kubeml run id (and so its own ledger), or the second would find the first's record.
SCHEDULED_RUN_ID = "[[RunUUID]]"


def schedule(cfg: EnvironmentConfig, *, cron: str, name: str, code_version: str, image: str | None = None,
             max_concurrency: int = 1, catchup: bool = False, session: KfpSession | None = None) -> Schedule:
    """Create a recurring run of the training pipeline (scheduled retraining) on ``cron``."""
    import kfp_server_api

    if max_concurrency < 1:
        raise ConfigError(f"--max-concurrency {max_concurrency} must be at least 1")
    expression = normalize_cron(cron)
    kf = cfg.kubeflow
    with tempfile.TemporaryDirectory() as tmp:
        package, root = _prepare(cfg, image, Path(tmp))
        session = session or connect(kf)
        experiment = _experiment(session, create=kf.create_experiment)
        params = {"config_json": cfg.model_dump_json(), "run_id": f"{name}-{SCHEDULED_RUN_ID}",
                  "code_version": code_version}
        job = _job_config(session, package, params, root)
    body = kfp_server_api.V2beta1RecurringRun(
        display_name=name, description=f"kubeml training pipeline on {expression}",
        experiment_id=experiment.experiment_id, pipeline_spec=job.pipeline_spec, runtime_config=job.runtime_config,
        service_account=kf.service_account, max_concurrency=str(max_concurrency), no_catchup=not catchup,
        mode=kfp_server_api.RecurringRunMode.ENABLE,
        trigger=kfp_server_api.V2beta1Trigger(cron_schedule=kfp_server_api.V2beta1CronSchedule(cron=expression)))
    created = session.call("creating the recurring run",
                           session.client._recurring_run_api.recurring_run_service_create_recurring_run,  # noqa: SLF001
                           recurring_run=body)
    return Schedule(recurring_run_id=created.recurring_run_id, name=name, cron=expression, experiment=kf.experiment,
                    experiment_id=experiment.experiment_id, namespace=kf.namespace,
                    url=f"{session.ui}/#/recurringrun/details/{created.recurring_run_id}")


_CRON_FIELDS = (("second", 0, 59), ("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31),
                ("month", 1, 12), ("day of week", 0, 6))
_NAMES = {"jan": 1, "feb": 2, "mar": 3, "apr": 4, "may": 5, "jun": 6, "jul": 7, "aug": 8, "sep": 9, "oct": 10,
          "nov": 11, "dec": 12, "sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}
_DESCRIPTORS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")


def normalize_cron(expression: str) -> str:
    """The cron expression in KFP's six-field form (seconds first), checked field by field.

    Five fields (standard cron) get ``0`` seconds prepended; the descriptors (``@daily``,
    ``@every 6h``) pass as they are. KFP's scheduler parses robfig/cron syntax: numbers,
    ``*``, ``?`` (day fields), ranges, lists, steps and month/day names. This check, not a
    dependency, because a misspelt schedule must fail here and not in the scheduler's log.
    """
    text = " ".join(expression.split())
    if text in _DESCRIPTORS or re.fullmatch(r"@every (\d+(\.\d+)?(ns|us|ms|s|m|h))+", text):
        return text
    fields = text.split(" ")
    if len(fields) == 5:
        fields = ["0", *fields]
    if len(fields) != 6:
        raise ConfigError(f"--cron {expression!r}: give 5 fields (minute hour day-of-month month day-of-week), 6 with "
                          "seconds first, or a descriptor such as @daily")
    for value, (what, low, high) in zip(fields, _CRON_FIELDS, strict=True):
        for part in value.split(","):
            _check_cron_part(expression, what, part, low, high)
    return " ".join(fields)


def _check_cron_part(expression: str, what: str, part: str, low: int, high: int) -> None:
    def bad(reason: str) -> ConfigError:
        return ConfigError(f"--cron {expression!r}: {what} {part!r} {reason}")

    base, _, step = part.partition("/")
    if step and not (step.isdigit() and int(step) > 0):
        raise bad("has a step that is not a positive number")
    if base in ("*", "?"):
        if base == "?" and what not in ("day of month", "day of week"):
            raise bad("uses ?, allowed only in the day fields")
        return
    ends = base.split("-")
    if len(ends) > 2 or not all(ends):
        raise bad("is not a number, a range a-b, * or ?")
    numbers = []
    for end in ends:
        number = _NAMES.get(end.lower()) if what in ("month", "day of week") and not end.isdigit() else None
        if number is None:
            if not end.isdigit():
                raise bad("is not a number, a range a-b, * or ?")
            number = int(end)
        if not low <= number <= high:
            raise bad(f"is out of range {low}-{high}")
        numbers.append(number)
    if len(numbers) == 2 and numbers[0] > numbers[1]:
        raise bad("is a range that ends before it starts")


# ----------------------------------------------------------------------------- follow


def follow(session: KfpSession, kfp_run_id: str, *, on_update: Callable[[Any], None] | None = None,
           poll_s: float | None = None, timeout_s: float | None = None,
           stop: threading.Event | None = None) -> Any:
    """Read the run every ``poll_s`` until it reaches a terminal state; return the last read.

    An API outage while following is waited out for up to five minutes (the run goes on
    without us); a refusal (401/403/404) ends the wait at once. ``stop`` set: return the
    last read as it is. Raises :class:`PipelineError` when ``timeout_s`` passes first.
    """
    poll_s = poll_s or session.config.poll_s
    timeout_s = timeout_s or session.config.timeout_s
    stop = stop or threading.Event()
    deadline = time.monotonic() + timeout_s
    run = None
    outage_since: float | None = None
    while True:
        try:
            run = session.call(f"reading run {kfp_run_id}", session.client._run_api.run_service_get_run,  # noqa: SLF001
                               run_id=kfp_run_id)
            outage_since = None
        except PipelineError as exc:
            if not exc.retryable:
                raise
            outage_since = outage_since or time.monotonic()
            if time.monotonic() - outage_since > _FOLLOW_OUTAGE_S:
                raise
        else:
            if on_update:
                on_update(run)
            if str(run.state) in TERMINAL_STATES:
                return run
        if time.monotonic() >= deadline:
            state = run.state if run is not None else "unknown"
            raise PipelineError(f"run {kfp_run_id} is still {state} after {timeout_s:.0f} s; it keeps going: "
                                f"{session.run_url(kfp_run_id)}")
        if stop.wait(min(poll_s, max(0.0, deadline - time.monotonic()))):
            return run


def run_parameters(run: Any) -> dict[str, Any]:
    """The parameters a KFP run was started with (``run_id`` is kubeml's ledger key)."""
    config = getattr(run, "runtime_config", None)
    return dict(getattr(config, "parameters", None) or {})


def failure_details(run: Any) -> str:
    """What the KFP run says about its failure: its error and each failed task's."""
    lines = []
    error = getattr(run, "error", None)
    if error is not None and getattr(error, "message", None):
        lines.append(error.message)
    for task in (getattr(getattr(run, "run_details", None), "task_details", None) or []):
        if str(task.state) == "FAILED":
            message = getattr(getattr(task, "error", None), "message", None) or "no message"
            lines.append(f"task {task.display_name}" + (f" (pod {task.pod_name})" if task.pod_name else "")
                         + f": {message}")
    return "\n".join(lines)
