"""A stand-in for the Kubeflow Pipelines v2 REST API, for tests of ``kfp.Client`` submission.

It is a stand-in, not KFP: the KFP backend is a Go server with MySQL, Argo Workflows and a
metadata store that this project does not build. It serves the endpoints a submission
uses (healthz, experiments, runs, recurring runs) on loopback, and checks every request
body and query against the models of the ``kfp-server-api`` package the client is built
on: an unknown field, a wrong type or an enum value the API does not define is a 400, as
the real server's strict JSON decoding makes it. It also applies the server's own rules
for what a submission needs (a name, a pipeline spec, parameters the pipeline declares,
a pipeline root) and, in multi-user mode, Kubeflow's namespace rules and access checks.

It runs nothing. A created run stays ``PENDING`` until a test moves it with
:meth:`KfpApiStandIn.advance`, the part a backend's controllers would play.

Credentials it accepts: bearer tokens and session cookies given to it, each with the
namespaces it may use. With ``login_redirect`` an unauthenticated request is redirected to
a login page, as Kubeflow's gateway (oauth2-proxy, authservice) does; otherwise it gets 401.
"""

from __future__ import annotations

import datetime as _dt
import http.server
import json
import re
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = ["KfpApiStandIn", "Recorded", "model_errors"]

_PREFIX = "/apis/v2beta1"


def model_errors(value: Any, type_name: str, where: str = "") -> list[str]:
    """How ``value`` (decoded JSON) breaks the ``kfp_server_api`` type ``type_name``: [] if it fits."""
    import kfp_server_api.models as models

    path = where or type_name
    if value is None:
        return []
    if type_name == "str":
        return [] if isinstance(value, str) else [f"{path}: expected a string, got {type(value).__name__}"]
    if type_name in ("int", "float"):
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)) or (
            isinstance(value, str) and re.fullmatch(r"-?\d+(\.\d+)?", value) is not None)
        return [] if ok else [f"{path}: expected a number, got {value!r}"]
    if type_name == "bool":
        return [] if isinstance(value, bool) else [f"{path}: expected true or false, got {value!r}"]
    if type_name == "object":
        return []
    if type_name == "datetime":
        if not isinstance(value, str):
            return [f"{path}: expected an RFC 3339 time, got {value!r}"]
        try:
            _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return [f"{path}: {value!r} is not an RFC 3339 time"]
        return []
    match = re.fullmatch(r"list\[(.+)\]", type_name)
    if match:
        if not isinstance(value, list):
            return [f"{path}: expected a list, got {type(value).__name__}"]
        return [e for i, item in enumerate(value) for e in model_errors(item, match.group(1), f"{path}[{i}]")]
    match = re.fullmatch(r"dict\(str, (.+)\)", type_name)
    if match:
        if not isinstance(value, dict):
            return [f"{path}: expected an object, got {type(value).__name__}"]
        return [e for key, item in value.items() for e in model_errors(item, match.group(1), f"{path}.{key}")]
    model = getattr(models, type_name, None)
    if model is None:
        return [f"{path}: the API has no type {type_name}"]
    allowed = getattr(model, "allowable_values", None)
    if allowed is not None:
        return [] if value in allowed else [f"{path}: {value!r} is not one of {', '.join(allowed)}"]
    if not isinstance(value, dict):
        return [f"{path}: expected an object ({type_name}), got {type(value).__name__}"]
    # protojson, which the server decodes with, takes a field's proto name and its lowerCamelCase form.
    by_json = {json_name: attr for attr, json_name in model.attribute_map.items()}
    by_json.update({re.sub(r"_([a-z])", lambda m: m.group(1).upper(), json_name): attr
                    for json_name, attr in list(by_json.items())})
    problems = []
    for key, item in value.items():
        attr = by_json.get(key)
        if attr is None:
            problems.append(f"{path}: unknown field {key!r} (known: {', '.join(sorted(model.attribute_map.values()))})")
            continue
        problems.extend(model_errors(item, model.openapi_types[attr], f"{path}.{key}"))
    return problems


@dataclass
class Recorded:
    """One request the stand-in answered."""

    method: str
    path: str
    query: dict[str, list[str]]
    body: Any
    status: int
    headers: dict[str, str] = field(default_factory=dict)


class _ApiError(Exception):
    # gRPC codes, as grpc-gateway puts them in KFP's error bodies.
    CODES = {400: 3, 401: 16, 403: 7, 404: 5, 409: 6, 500: 13}

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class KfpApiStandIn:
    """The stand-in server; a context manager that serves on ``127.0.0.1`` while open.

    Args:
        multi_user: Kubeflow's multi-user mode: experiments live in profile namespaces.
        tokens: bearer token -> the namespaces it may use (None: any). Empty with no
            ``cookies``: no authentication at all.
        cookies: ``NAME=VALUE`` session cookie -> namespaces, like ``tokens``.
        login_redirect: answer an unauthenticated request with a redirect to a login page.
        namespaces: the profile namespaces that exist (multi-user).
    """

    def __init__(self, *, multi_user: bool = False, tokens: dict[str, Iterable[str] | None] | None = None,
                 cookies: dict[str, Iterable[str] | None] | None = None, login_redirect: bool = False,
                 namespaces: Iterable[str] = ()):
        self.multi_user = multi_user
        self.tokens = {k: (set(v) if v is not None else None) for k, v in (tokens or {}).items()}
        self.cookies = {k: (set(v) if v is not None else None) for k, v in (cookies or {}).items()}
        self.login_redirect = login_redirect
        self.namespaces = set(namespaces)
        self.experiments: dict[str, dict[str, Any]] = {}
        self.runs: dict[str, dict[str, Any]] = {}
        self.recurring_runs: dict[str, dict[str, Any]] = {}
        self.requests: list[Recorded] = []
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None, "the stand-in is not serving"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> KfpApiStandIn:
        stand_in = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server's protocol
                stand_in._handle(self, "GET")

            def do_POST(self) -> None:  # noqa: N802
                stand_in._handle(self, "POST")

            def do_DELETE(self) -> None:  # noqa: N802
                stand_in._handle(self, "DELETE")

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="kfp-api-stand-in", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # -- what a backend would do ----------------------------------------------------

    def add_experiment(self, name: str, namespace: str | None = None) -> str:
        """An experiment that exists before the test (made in the UI, say); its id."""
        with self._lock:
            return self._new_experiment({"display_name": name, "namespace": namespace})["experiment_id"]

    def advance(self, run_id: str, state: str, *, tasks: Iterable[tuple[str, str, str | None]] = (),
                error: str | None = None) -> None:
        """Move run ``run_id`` to ``state``, with task details ``(name, state, error)``."""
        import kfp_server_api

        if state not in kfp_server_api.V2beta1RuntimeState.allowable_values:
            raise ValueError(f"{state!r} is not a KFP runtime state")
        now = _now()
        with self._lock:
            run = self.runs[run_id]
            run["state"] = state
            run.setdefault("state_history", []).append({"update_time": now, "state": state})
            run["run_details"] = {"task_details": [
                {"run_id": run_id, "task_id": f"task-{i}", "display_name": name, "state": task_state,
                 "pod_name": f"{run['display_name']}-{name}-{i}",
                 **({"error": {"code": 2, "message": message}} if message else {})}
                for i, (name, task_state, message) in enumerate(tasks)]}
            if error:
                run["error"] = {"code": 2, "message": error}
            if state in ("SUCCEEDED", "FAILED", "SKIPPED", "CANCELED"):
                run["finished_at"] = now

    # -- the API --------------------------------------------------------------------

    def _handle(self, handler: http.server.BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(handler.path)
        query = parse_qs(parts.query)
        body: Any = None
        headers = {k.title(): v for k, v in handler.headers.items()}  # one spelling of each name
        status, answer, extra = 200, {}, {}
        try:
            length = int(handler.headers.get("Content-Length") or 0)
            raw = handler.rfile.read(length) if length else b""
            if raw:
                try:
                    body = json.loads(raw)
                except ValueError:
                    raise _ApiError(400, "the body is not JSON") from None
            allowed = self._authenticate(handler)
            with self._lock:
                answer = self._route(method, parts.path, query, body, allowed)
        except _ApiError as exc:
            status, extra = exc.status, exc.headers
            answer = {"error": exc.message, "code": _ApiError.CODES.get(exc.status, 2), "message": exc.message,
                      "details": []}
        with self._lock:
            self.requests.append(Recorded(method, parts.path, query, body, status, headers))
        data = json.dumps(answer).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "text/html" if status in (301, 302) else "application/json")
        for key, value in extra.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def _authenticate(self, handler: http.server.BaseHTTPRequestHandler) -> set[str] | None:
        """The namespaces the request's credential may use (None: all); raises 401/302 without one."""
        if not self.tokens and not self.cookies:
            return None
        auth = handler.headers.get("Authorization") or ""
        if auth.startswith("Bearer ") and auth[len("Bearer "):] in self.tokens:
            return self.tokens[auth[len("Bearer "):]]
        for cookie in (handler.headers.get("Cookie") or "").split(";"):
            if cookie.strip() in self.cookies:
                return self.cookies[cookie.strip()]
        if self.login_redirect:
            raise _ApiError(302, "login required", {"Location": "/dex/auth?client_id=kubeflow-oidc-authservice"})
        raise _ApiError(401, "Unauthenticated: Request header error: there is no user identity header"
                        if not auth else "Unauthenticated: the token is not valid")

    def _route(self, method: str, path: str, query: dict[str, list[str]], body: Any,
               allowed: set[str] | None) -> dict[str, Any]:
        if not path.startswith(_PREFIX):
            raise _ApiError(404, f"no route {path}")
        path = path[len(_PREFIX):]
        if method == "GET" and path == "/healthz":
            return {"commit_sha": "stand-in", "tag_name": "stand-in", "multi_user": self.multi_user}
        if path == "/experiments" and method == "GET":
            return self._list_experiments(query, allowed)
        if path == "/experiments" and method == "POST":
            self._check(body, "V2beta1Experiment")
            return self._create_experiment(body, allowed)
        match = re.fullmatch(r"/experiments/([^/]+)", path)
        if match and method == "GET":
            return self._experiment(match.group(1), allowed)
        if path == "/runs" and method == "POST":
            self._check(body, "V2beta1Run")
            return self._create(body, allowed, self.runs, "run_id", recurring=False)
        match = re.fullmatch(r"/runs/([^/:]+)", path)
        if match and method == "GET":
            run = self.runs.get(match.group(1))
            if run is None:
                raise _ApiError(404, f"Failed to get run: ResourceNotFoundError: Run {match.group(1)} not found")
            self._experiment(run["experiment_id"], allowed)
            return json.loads(json.dumps(run))
        if path == "/recurringruns" and method == "POST":
            self._check(body, "V2beta1RecurringRun")
            return self._create(body, allowed, self.recurring_runs, "recurring_run_id", recurring=True)
        raise _ApiError(404, f"no route {method} {_PREFIX}{path}")

    @staticmethod
    def _check(body: Any, model: str) -> None:
        if not isinstance(body, dict):
            raise _ApiError(400, f"Invalid input error: the body must be a JSON object ({model})")
        problems = model_errors(body, model)
        if problems:
            raise _ApiError(400, "Invalid input error: " + "; ".join(problems))

    def _namespace(self, namespace: str | None, allowed: set[str] | None, verb: str) -> None:
        if not self.multi_user:
            if namespace:
                raise _ApiError(400, "Invalid input error: namespace is not used in single-user mode")
            return
        if not namespace:
            raise _ApiError(400, f"Invalid input error: in multi-user mode, {verb} needs a namespace")
        if namespace not in self.namespaces:
            raise _ApiError(404, f"namespace {namespace} not found")
        if allowed is not None and namespace not in allowed:
            raise _ApiError(403, f"PermissionDenied: the user may not {verb} in namespace {namespace}")

    def _list_experiments(self, query: dict[str, list[str]], allowed: set[str] | None) -> dict[str, Any]:
        namespace = (query.get("namespace") or [None])[0]
        self._namespace(namespace, allowed, "list experiments")
        found = [e for e in self.experiments.values() if e.get("namespace") == (namespace if self.multi_user else None)]
        raw_filter = (query.get("filter") or [None])[0]
        if raw_filter:
            try:
                spec = json.loads(raw_filter)
            except ValueError:
                raise _ApiError(400, "Invalid input error: filter is not JSON") from None
            problems = model_errors(spec, "V2beta1Filter", "filter")
            if problems:
                raise _ApiError(400, "Invalid input error: " + "; ".join(problems))
            for predicate in spec.get("predicates") or []:
                if predicate.get("key") != "display_name" or predicate.get("operation") != "EQUALS":
                    raise _ApiError(400, f"Invalid input error: the stand-in filters on display_name EQUALS only, "
                                    f"not {predicate}")
                found = [e for e in found if e["display_name"] == predicate.get("string_value",
                                                                              predicate.get("stringValue"))]
        size = int((query.get("page_size") or ["0"])[0] or 0) or len(found)
        page = found[:size]
        return {"experiments": page, "total_size": len(found)} if page else {"total_size": 0}

    def _experiment(self, experiment_id: str, allowed: set[str] | None) -> dict[str, Any]:
        experiment = self.experiments.get(experiment_id)
        if experiment is None:
            raise _ApiError(404, f"Failed to get experiment: ResourceNotFoundError: Experiment {experiment_id} not found")
        self._namespace(experiment.get("namespace"), allowed, "use experiments")
        return dict(experiment)

    def _create_experiment(self, body: dict[str, Any], allowed: set[str] | None) -> dict[str, Any]:
        if not body.get("display_name"):
            raise _ApiError(400, "Invalid input error: Experiment name is empty. Please specify a valid experiment name")
        self._namespace(body.get("namespace"), allowed, "create experiments")
        if any(e["display_name"] == body["display_name"] and e.get("namespace") == body.get("namespace")
               for e in self.experiments.values()):
            raise _ApiError(409, f"Already exist error: experiment {body['display_name']} exists")
        return dict(self._new_experiment(body))

    def _new_experiment(self, body: dict[str, Any]) -> dict[str, Any]:
        experiment = {"experiment_id": str(uuid.uuid4()), "display_name": body["display_name"],
                      "description": body.get("description") or "", "created_at": _now(),
                      "storage_state": "AVAILABLE"}
        if body.get("namespace"):
            experiment["namespace"] = body["namespace"]
        self.experiments[experiment["experiment_id"]] = experiment
        return experiment

    def _create(self, body: dict[str, Any], allowed: set[str] | None, into: dict[str, dict[str, Any]],
                id_key: str, *, recurring: bool) -> dict[str, Any]:
        what = "recurring run" if recurring else "run"
        if not body.get("display_name"):
            raise _ApiError(400, f"Invalid input error: the {what} name is empty")
        if not body.get("experiment_id"):
            raise _ApiError(400, f"Invalid input error: the {what} needs an experiment_id (the stand-in has no default "
                            "experiment)")
        experiment = self._experiment(body["experiment_id"], allowed)
        if bool(body.get("pipeline_spec")) == bool(body.get("pipeline_version_reference")):
            raise _ApiError(400, f"Invalid input error: a {what} needs either pipeline_spec or "
                            "pipeline_version_reference")
        if body.get("pipeline_version_reference"):
            raise _ApiError(400, "Invalid input error: the stand-in takes inline pipeline specs only")
        self._check_spec(body["pipeline_spec"], body.get("runtime_config") or {})
        if recurring:
            self._check_trigger(body.get("trigger") or {})
        created = json.loads(json.dumps(body))
        created[id_key] = str(uuid.uuid4())
        created["created_at"] = _now()
        if experiment.get("namespace"):
            created["namespace"] = experiment["namespace"]
        if recurring:
            created["status"] = "ENABLED" if body.get("mode", "ENABLE") == "ENABLE" else "DISABLED"
        else:
            created["state"] = "PENDING"
            created["state_history"] = [{"update_time": created["created_at"], "state": "PENDING"}]
            created["storage_state"] = "AVAILABLE"
        into[created[id_key]] = created
        return json.loads(json.dumps(created))

    @staticmethod
    def _check_spec(spec: Any, runtime_config: dict[str, Any]) -> None:
        if isinstance(spec, dict) and "pipeline_spec" in spec:
            spec = spec["pipeline_spec"]
        missing = [k for k in ("pipelineInfo", "root", "components", "deploymentSpec", "schemaVersion")
                   if not isinstance(spec, dict) or k not in spec]
        if missing:
            raise _ApiError(400, f"Invalid input error: the pipeline spec lacks {', '.join(missing)}")
        declared = ((spec["root"].get("inputDefinitions") or {}).get("parameters") or {})
        given = runtime_config.get("parameters") or {}
        unknown = sorted(set(given) - set(declared))
        if unknown:
            raise _ApiError(400, f"Invalid input error: parameters {', '.join(unknown)} are not inputs of the pipeline")
        required = sorted(name for name, p in declared.items()
                          if not p.get("isOptional") and "defaultValue" not in p and name not in given)
        if required:
            raise _ApiError(400, f"Invalid input error: the pipeline needs parameters {', '.join(required)}")
        root = runtime_config.get("pipeline_root") or spec.get("defaultPipelineRoot")
        if not root:
            raise _ApiError(400, "Invalid input error: no pipeline root: the run gives none and the server has no "
                            "default")

    @staticmethod
    def _check_trigger(trigger: dict[str, Any]) -> None:
        cron = (trigger.get("cron_schedule") or {}).get("cron")
        periodic = (trigger.get("periodic_schedule") or {}).get("interval_second")
        if bool(cron) == bool(periodic):
            raise _ApiError(400, "Invalid input error: a recurring run needs a cron or a periodic schedule")
        if cron and not cron.startswith("@") and len(cron.split()) != 6:
            raise _ApiError(400, f"Invalid input error: cron {cron!r} needs 6 fields (seconds first)")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
