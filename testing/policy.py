"""The Kubernetes policy scan: everything kubeml deploys, scored by kube-score, with waivers.

What is scanned, each source on its own (cross-object checks such as "every pod is selected
by a NetworkPolicy" look only within one source):

- ``chart``: ``helm template`` of charts/kubeml-platform with default values;
- ``overlays/dev``, ``overlays/staging``, ``overlays/prod``: ``kubectl kustomize`` of each;
- ``generated``: what kubeml creates in a tenant namespace: the Tenant operator's children
  (operators/_desired.py), a RayJob (training/launchers/kuberay.py), and InferenceServices
  with one model and with a canary, in Knative and standard mode (serving/inferenceservice.py).

kube-score reads only the built-in kinds. The pod templates inside the custom resources are
therefore extracted into the objects their controllers create from them: the Ray head and
each worker group become Pods (KubeRay creates bare Pods), each predictor and canary a
Deployment (what KServe's raw mode creates, and what a Knative revision runs as). Containers
that the controllers inject themselves (KServe's storage initializer and queue-proxy, Ray's
autoscaler) are not ours and not scanned. A custom resource that carries containers this
module does not know how to extract is an error, so a new one cannot slip through unscanned.

A finding of grade "critical" counts as high; it fails the scan unless ``policy/waivers.yaml``
waives it, with a reason, for that check, object and source. A waiver that matches no high
finding is stale and fails the scan too, so waivers go away with the problem they excused.
The scanner runs with ``--disable-ignore-checks-annotations``: an annotation in a manifest
cannot hide a finding, only the waivers file can.
"""

from __future__ import annotations

import copy
import json
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubeml.testing.cluster._assets import cache_root

from kubeml.errors import AssetsMissing

__all__ = [
    "Finding",
    "PolicyError",
    "Verdict",
    "Waiver",
    "evaluate",
    "find_scanner",
    "generated_manifests",
    "load_waivers",
    "project_sources",
    "scan",
    "scanner_version",
]

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "kubeml-platform"
OVERLAYS = REPO / "manifests" / "overlays"
WAIVERS = REPO / "policy" / "waivers.yaml"
VERSIONS = REPO / "hack" / "policy" / "versions.env"
INSTALL_HINT = "run `make policy-assets` (or `bash hack/policy/install.sh`) to build it"

#: The tenant namespace the generated manifests are rendered into.
TENANT = "team-a"
#: Annotation on an extracted object naming the custom resource and the template it came from.
ORIGIN_ANNOTATION = "kubeml.io/policy-origin"
#: kube-score's grades (scorecard.Grade): 1 critical, 5 warning, 7 almost OK, 10 OK.
_SEVERITY = {1: "high", 5: "medium", 7: "low"}
#: Optional checks turned on: RuntimeDefault seccomp is part of Pod Security "restricted".
OPTIONAL_CHECKS = ("container-seccomp-profile",)
#: Kinds whose pods kube-score scores; any other kind with containers must be extracted.
_POD_KINDS = {"Pod", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob"}
#: Fields of a KServe component spec that are not pod spec fields.
_KSERVE_COMPONENT_FIELDS = {
    "minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "scaleMetricType", "autoScaling",
    "containerConcurrency", "timeout", "canaryTrafficPercent", "logger", "batcher", "labels",
    "annotations", "deploymentStrategy", "storageUri", "model",
}  # fmt: skip


class PolicyError(Exception):
    """The scan could not run or its inputs are wrong (not a finding)."""


# --- the scanner ------------------------------------------------------------------------------

def scanner_version() -> str:
    for line in VERSIONS.read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "KUBE_SCORE_VERSION":
            return value.strip()
    raise PolicyError(f"{VERSIONS} sets no KUBE_SCORE_VERSION")


def find_scanner() -> Path:
    """The cached kube-score binary of the pinned version (hack/policy/install.sh builds it)."""
    path = cache_root() / f"kube-score-v{scanner_version()}" / "bin" / "kube-score"
    if not path.is_file():
        raise AssetsMissing(f"kube-score v{scanner_version()} is not at {path}; {INSTALL_HINT}")
    return path


@dataclass(frozen=True)
class Finding:
    """One failed kube-score check on one object of one source."""

    source: str
    check: str
    object: str
    """``Kind/name`` as scanned (an extracted object carries its origin in :attr:`origin`)."""
    severity: str
    messages: tuple[str, ...] = ()
    origin: str = ""

    def describe(self) -> str:
        where = f"{self.object} (from {self.origin})" if self.origin else self.object
        text = "; ".join(self.messages) or "no detail"
        return f"[{self.severity}] {self.check} on {where} in {self.source}: {text}"


def _docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def _has_containers(node: Any) -> bool:
    if isinstance(node, dict):
        return "containers" in node or any(_has_containers(v) for v in node.values())
    if isinstance(node, list):
        return any(_has_containers(v) for v in node)
    return False


def _extracted(kind: str, name: str, namespace: str | None, labels: Mapping[str, str], pod_spec: dict[str, Any],
               origin: str, replicas: int | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": dict(labels), "annotations": {ORIGIN_ANNOTATION: origin}}
    if namespace:
        meta["namespace"] = namespace
    if kind == "Pod":
        return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": pod_spec}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
            "spec": {"replicas": replicas, "selector": {"matchLabels": dict(labels)},
                     "template": {"metadata": {"labels": dict(labels)}, "spec": pod_spec}}}


def _rayjob_pods(doc: dict[str, Any]) -> list[dict[str, Any]]:
    meta = doc["metadata"]
    name, ns = meta["name"], meta.get("namespace")
    cluster = doc["spec"]["rayClusterSpec"]
    ref = f"RayJob/{name}"
    head = cluster["headGroupSpec"]["template"]
    pods = [_extracted("Pod", f"{name}-head", ns, {**head.get("metadata", {}).get("labels", {}),
                                                  "ray.io/node-type": "head"},
                       copy.deepcopy(head["spec"]), f"{ref} spec.rayClusterSpec.headGroupSpec.template")]
    for i, group in enumerate(cluster.get("workerGroupSpecs", [])):
        tmpl = group["template"]
        pods.append(_extracted(
            "Pod", f"{name}-{group['groupName']}-worker", ns,
            {**tmpl.get("metadata", {}).get("labels", {}), "ray.io/node-type": "worker",
             "ray.io/group": group["groupName"]},
            copy.deepcopy(tmpl["spec"]), f"{ref} spec.rayClusterSpec.workerGroupSpecs[{i}].template"))
    return pods


def _isvc_deployments(doc: dict[str, Any]) -> list[dict[str, Any]]:
    meta = doc["metadata"]
    name, ns = meta["name"], meta.get("namespace")
    spec = doc["spec"]
    components = [("predictor", spec["predictor"], "spec.predictor")]
    components += [("canary", c["predictor"], f"spec.canary[{i}].predictor") for i, c in enumerate(spec.get("canary", []))]
    out = []
    for role, component, path in components:
        pod_spec = {k: copy.deepcopy(v) for k, v in component.items() if k not in _KSERVE_COMPONENT_FIELDS}
        labels = {**meta.get("labels", {}), **component.get("labels", {}),
                  "serving.kserve.io/inferenceservice": name, "component": role}
        out.append(_extracted("Deployment", f"{name}-{role}", ns, labels, pod_spec,
                              f"InferenceService/{name} {path}", replicas=max(1, component.get("minReplicas", 1))))
    return out


_EXTRACTORS = {("ray.io", "RayJob"): _rayjob_pods, ("serving.kserve.io", "InferenceService"): _isvc_deployments}


def scannable(docs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """``docs`` with each known custom resource replaced by the objects holding its pod templates.

    Raises :class:`PolicyError` for a custom resource with containers and no extractor.
    """
    out = []
    for doc in docs:
        group = doc.get("apiVersion", "").partition("/")[0] if "/" in doc.get("apiVersion", "") else ""
        extract = _EXTRACTORS.get((group, doc.get("kind")))
        if extract is not None:
            out.extend(extract(doc))
        elif doc.get("kind") not in _POD_KINDS and doc.get("kind") != "CustomResourceDefinition" \
                and _has_containers(doc.get("spec")):
            raise PolicyError(f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')} ({doc.get('apiVersion')}) "
                              "holds containers that kube-score cannot read and testing/policy.py does not "
                              "extract: add an extractor for its pod templates")
        else:
            out.append(doc)
    return out


def scan(sources: Mapping[str, list[dict[str, Any]]], scanner: Path | str, *,
         kubernetes_version: str = "v1.37") -> tuple[list[Finding], dict[str, list[str]]]:
    """Run kube-score over each source; return the findings and, per source, the objects scored.

    Custom resources are extracted first (:func:`scannable`). Raises :class:`PolicyError` when
    kube-score fails or answers something that is not its JSON report.
    """
    findings: list[Finding] = []
    scored: dict[str, list[str]] = {}
    argv_flags = ["score", "--output-format", "json", "--color", "never", "--kubernetes-version", kubernetes_version,
                  "--disable-ignore-checks-annotations"]
    for check in OPTIONAL_CHECKS:
        argv_flags += ["--enable-optional-test", check]
    for source, docs in sources.items():
        with tempfile.TemporaryDirectory(prefix="kubeml-policy-") as tmp:
            path = Path(tmp) / "manifests.yaml"
            path.write_text(yaml.safe_dump_all(scannable(docs), sort_keys=False))
            result = subprocess.run([str(scanner), *argv_flags, str(path)], capture_output=True, text=True, timeout=120, check=False)
        # kube-score exits 1 when it found something critical; anything else is a failure to run.
        if result.returncode not in (0, 1):
            raise PolicyError(f"kube-score failed on {source} (exit {result.returncode}): {result.stderr.strip()}")
        try:
            report = json.loads(result.stdout)
        except json.JSONDecodeError as exc:
            raise PolicyError(f"kube-score gave no JSON report for {source} ({exc}): "
                              f"{(result.stderr or result.stdout).strip()[:500]}") from None
        if not isinstance(report, list):
            raise PolicyError(f"kube-score's report for {source} is not a list of objects")
        scored[source] = []
        for obj in report:
            meta = obj.get("object_meta") or {}
            ident = f"{obj['type_meta']['kind']}/{meta.get('name', '')}"
            scored[source].append(ident)
            origin = (meta.get("annotations") or {}).get(ORIGIN_ANNOTATION, "")
            for check in obj.get("checks") or []:
                if check.get("skipped") or check["grade"] >= 10:
                    continue
                messages = tuple(
                    f"{c['path']}: {c['summary']}" if c.get("path") else c["summary"]
                    for c in check.get("comments") or [])
                findings.append(Finding(source, check["check"]["id"], ident,
                                        _SEVERITY.get(check["grade"], "high"), messages, origin))
    return findings, scored


# --- the project's manifests ---------------------------------------------------------------------

def generated_manifests() -> list[dict[str, Any]]:
    """What kubeml itself creates in a tenant namespace, from the real generators."""
    from kubeml.operators import OperatorConfig, desired_children, parse_tenant
    from kubeml.serving.inferenceservice import (
        PredictorConfig,
        inference_service,
        with_canary,
    )
    from kubeml.training.launchers.kuberay import rayjob_manifest

    from kubeml.config import KubemlConfig

    tenant = parse_tenant({"metadata": {"name": TENANT, "uid": "policy-scan"},
                           "spec": {"owners": ["alice"], "members": [{"name": "bob", "role": "editor"}]}})
    children = desired_children(tenant, OperatorConfig())
    cfg = KubemlConfig(environments={"prod": {
        "artifact_store": {"uri": "s3://ml-artifacts/kubeml"},
        "training": {"target": "kuberay", "workers": 2, "launcher": {"namespace": TENANT}}}}).environment("prod")
    rayjob = rayjob_manifest(cfg, run_id="policy-scan", dataset="digits", dataset_version="v1")

    def predictor(version: str) -> PredictorConfig:
        return PredictorConfig(image="ghcr.io/kubeml/kubeml-server:0.1.0", model_name="digits-cnn", version=version,
                               storage_uri=f"s3://ml-artifacts/kubeml/models/digits-cnn/{version}")

    single = inference_service("digits", predictor("3"), namespace=TENANT)
    knative = with_canary(inference_service("digits-kn", predictor("3"), namespace=TENANT), predictor("4"), 10)
    standard = with_canary(inference_service("digits-std", predictor("3"), mode="standard", namespace=TENANT),
                           predictor("4"), 10)
    return [*children, rayjob, single, knative, standard]


def project_sources(helm: Path | str, kubectl: Path | str) -> dict[str, list[dict[str, Any]]]:
    """Every source the scan covers, rendered: the chart, the three overlays, the generated."""
    def run(argv: list[str]) -> list[dict[str, Any]]:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        if result.returncode != 0:
            raise PolicyError(f"{' '.join(argv[:2])} failed (exit {result.returncode}): {result.stderr.strip()}")
        return _docs(result.stdout)

    sources = {"chart": run([str(helm), "template", "kubeml", str(CHART), "--namespace", "kubeml-system",
                             "--include-crds", "--kube-version", "1.37.0"])}
    for overlay in sorted(p.name for p in OVERLAYS.iterdir() if (p / "kustomization.yaml").is_file()):
        sources[f"overlays/{overlay}"] = run([str(kubectl), "kustomize", str(OVERLAYS / overlay)])
    sources["generated"] = generated_manifests()
    return sources


# --- waivers ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Waiver:
    """A high finding accepted on purpose: this check, on this object, in these sources."""

    check: str
    object: str
    sources: tuple[str, ...]
    reason: str


_WAIVER_KEYS = {"check", "object", "sources", "reason"}


def load_waivers(path: Path | str = WAIVERS) -> list[Waiver]:
    """The waivers in ``path`` (a missing file means none). Raises :class:`PolicyError` naming
    the entry for a malformed one: a missing key, an unknown key, an empty reason, a duplicate."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        body = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise PolicyError(f"{path} is not YAML: {exc}") from None
    entries = body.get("waivers") if isinstance(body, dict) else None
    if entries is None:
        entries = []
    if not isinstance(entries, list) or (isinstance(body, dict) and set(body) - {"waivers"}):
        raise PolicyError(f"{path} must hold one key, `waivers`, a list of entries")
    waivers: list[Waiver] = []
    seen: set[tuple[str, str, str]] = set()
    for i, entry in enumerate(entries):
        where = f"{path.name} entry {i}"
        if not isinstance(entry, dict):
            raise PolicyError(f"{where} is not a mapping")
        if missing := _WAIVER_KEYS - set(entry):
            raise PolicyError(f"{where} lacks {', '.join(sorted(missing))}")
        if unknown := set(entry) - _WAIVER_KEYS:
            raise PolicyError(f"{where} has unknown keys {', '.join(sorted(unknown))}; allowed: "
                              f"{', '.join(sorted(_WAIVER_KEYS))}")
        sources = entry["sources"]
        if isinstance(sources, str) or not isinstance(sources, list) or not sources \
                or not all(isinstance(s, str) and s for s in sources):
            raise PolicyError(f"{where}: sources must be a non-empty list of source names")
        reason = entry["reason"]
        if not isinstance(reason, str) or len(reason.split()) < 5:
            raise PolicyError(f"{where} ({entry['check']} on {entry['object']}): the reason must say why, "
                              "in a sentence a reviewer can check")
        for source in sources:
            key = (entry["check"], entry["object"], source)
            if key in seen:
                raise PolicyError(f"{where} waives {entry['check']} on {entry['object']} in {source} a second time")
            seen.add(key)
        waivers.append(Waiver(str(entry["check"]), str(entry["object"]), tuple(sources), " ".join(reason.split())))
    return waivers


@dataclass
class Verdict:
    """The outcome: high findings nobody waived, waivers that matched nothing, and the rest."""

    unwaived: list[Finding] = field(default_factory=list)
    stale: list[tuple[Waiver, str]] = field(default_factory=list)
    waived: list[tuple[Finding, Waiver]] = field(default_factory=list)
    other: list[Finding] = field(default_factory=list)
    """Findings below high (warnings): reported, never failing."""

    @property
    def ok(self) -> bool:
        return not self.unwaived and not self.stale

    def report(self) -> str:
        lines = []
        if self.unwaived:
            lines.append(f"{len(self.unwaived)} high finding(s) not waived in policy/waivers.yaml "
                         "(fix the manifest, or waive it there with a reason):")
            lines += [f"  {f.describe()}" for f in self.unwaived]
        if self.stale:
            lines.append(f"{len(self.stale)} stale waiver(s) that match no high finding (remove them):")
            lines += [f"  {w.check} on {w.object} in {source}" for w, source in self.stale]
        lines.append(f"{len(self.waived)} high finding(s) waived, {len(self.other)} below high")
        return "\n".join(lines)


def evaluate(findings: Iterable[Finding], waivers: Iterable[Waiver]) -> Verdict:
    verdict = Verdict()
    waivers = list(waivers)
    index = {(w.check, w.object, s): w for w in waivers for s in w.sources}
    used: set[tuple[str, str, str]] = set()
    for f in findings:
        if f.severity != "high":
            verdict.other.append(f)
            continue
        key = (f.check, f.object, f.source)
        if key in index:
            used.add(key)
            verdict.waived.append((f, index[key]))
        else:
            verdict.unwaived.append(f)
    verdict.stale = [(index[k], k[2]) for k in index if k not in used]
    return verdict
