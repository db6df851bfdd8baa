"""Typed KFP artifacts of the pipeline's steps: what the Kubeflow UI draws and what lineage links.

The stages keep their plain signatures and their run ledger; a component calls the stage,
then one function here that turns what the stage recorded into its typed outputs:

- the environment's configuration: an ``Artifact`` (``config.json``), the one input that
  carries it from step to step;
- ingest: a ``Dataset``: the version's manifest, with name, version and row counts as metadata;
- train: a ``Model``: the bundle's manifest, with its store URI, target and final metrics;
- evaluate: ``Metrics`` (accuracy, macro-F1), ``ClassificationMetrics`` (the confusion
  matrix the UI draws) and an ``HTML`` report with the training curves.

Downstream steps read name, version and bundle key from these artifacts' metadata. The
artifact objects are KFP's (``dsl.Output[...]``/``dsl.Input[...]``): anything with ``path``
and ``metadata`` (and ``log_metric`` / ``log_confusion_matrix`` for the metrics) will do,
so this module does not import kfp.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from kubeml.errors import ConfigError

__all__ = [
    "config_json_of",
    "dataset_of",
    "metric_of",
    "model_of",
    "write_config",
    "write_dataset",
    "write_evaluation",
    "write_model",
]


def _record(config_json: str, run_id: str, stage: str) -> Any:
    from kubeml.pipelines.stages._common import open_stage

    return open_stage(config_json, run_id).ledger.read(stage)


def _write_json(artifact: Any, body: Any) -> None:
    path = Path(artifact.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=2, sort_keys=True, default=str))


def write_config(config_json: str, artifact: Any) -> None:
    """The configuration artifact: the validated environment, and a few keys to read at a glance."""
    from kubeml.config import EnvironmentConfig

    cfg = EnvironmentConfig.model_validate_json(config_json)
    _write_json(artifact, json.loads(cfg.model_dump_json()))
    artifact.metadata.update({"environment": cfg.name, "approval": cfg.approval, "model": cfg.training.model,
                              "training_target": cfg.training.target, "serving_target": cfg.serving.target,
                              "artifact_store": cfg.artifact_store.uri})


def config_json_of(artifact: Any) -> str:
    """The configuration JSON a step was given as its ``config`` artifact."""
    try:
        return Path(artifact.path).read_text()
    except OSError as exc:
        raise ConfigError(f"the configuration artifact {artifact.path} cannot be read: {exc.strerror}") from None


def write_dataset(config_json: str, run_id: str, artifact: Any) -> None:
    """The ``Dataset`` of this run's ingest: the manifest of the stored version."""
    outputs = _record(config_json, run_id, "ingest").outputs
    _write_json(artifact, {"dataset": outputs["dataset"], "version": outputs["version"],
                           "store_key": f"datasets/{outputs['dataset']}/{outputs['version']}"})
    artifact.metadata.update({k: outputs[k] for k in ("dataset", "version", "rows", "train_rows", "test_rows")
                              if k in outputs})


def dataset_of(artifact: Any) -> tuple[str, str]:
    """``(name, version)`` of a ``Dataset`` written by :func:`write_dataset`."""
    try:
        return str(artifact.metadata["dataset"]), str(artifact.metadata["version"])
    except KeyError as exc:
        raise ConfigError(f"the Dataset artifact {artifact.path} has no {exc.args[0]!r} in its metadata: it was not "
                          "written by kubeml's ingest") from None


def write_model(config_json: str, run_id: str, artifact: Any) -> None:
    """The ``Model`` of this run's train step: the bundle's place and what it was trained to."""
    outputs = _record(config_json, run_id, "train").outputs
    history = outputs.get("history") or []
    last = history[-1] if history else {}
    _write_json(artifact, {"bundle_key": outputs["bundle_key"], "bundle_uri": outputs.get("bundle_uri"),
                           "checkpoint_uri": outputs.get("checkpoint_uri"), "history": history})
    metadata = {"bundle_key": outputs["bundle_key"], "bundle_uri": outputs.get("bundle_uri"),
                "framework": "pytorch", "target": outputs.get("target"), "epochs": outputs.get("epochs"),
                "final_loss": outputs.get("final_loss"), "val_accuracy": last.get("val_accuracy")}
    artifact.metadata.update({k: v for k, v in metadata.items() if v is not None})


def model_of(artifact: Any) -> str:
    """The bundle's store key of a ``Model`` written by :func:`write_model`."""
    try:
        return str(artifact.metadata["bundle_key"])
    except KeyError:
        raise ConfigError(f"the Model artifact {artifact.path} has no 'bundle_key' in its metadata: it was not "
                          "written by kubeml's train step") from None


def write_evaluation(config_json: str, run_id: str, metrics: Any, confusion: Any, report: Any) -> tuple[float, float]:
    """``Metrics``, ``ClassificationMetrics`` and the HTML report of this run's evaluation."""
    evaluation = _record(config_json, run_id, "evaluate").outputs
    train = _record(config_json, run_id, "train").outputs
    accuracy, macro_f1 = float(evaluation["accuracy"]), float(evaluation["macro_f1"])
    for name in ("accuracy", "macro_f1", "test_samples"):
        if name in evaluation:
            metrics.log_metric(name, float(evaluation[name]))
    matrix = [[int(v) for v in row] for row in evaluation["confusion_matrix"]]
    categories = [str(i) for i in range(len(matrix))]
    confusion.log_confusion_matrix(categories, matrix)
    Path(report.path).parent.mkdir(parents=True, exist_ok=True)
    Path(report.path).write_text(_report_html(run_id, accuracy, macro_f1, matrix, train.get("history") or []))
    return accuracy, macro_f1


def _curve(points: list[float], width: int = 360, height: int = 160) -> str:
    """An SVG polyline of ``points`` (one per epoch), scaled to the box."""
    if not points:
        return "<p>no epochs recorded</p>"
    low, high = min(points), max(points)
    span = (high - low) or 1.0
    step = width / max(1, len(points) - 1)
    coords = " ".join(f"{i * step:.1f},{height - (p - low) / span * height:.1f}" for i, p in enumerate(points))
    return (f'<svg width="{width + 60}" height="{height + 30}" viewBox="-50 -10 {width + 60} {height + 30}">'
            f'<polyline fill="none" stroke="#1a73e8" stroke-width="2" points="{coords}"/>'
            f'<text x="-48" y="10" font-size="11">{high:.4g}</text>'
            f'<text x="-48" y="{height}" font-size="11">{low:.4g}</text>'
            f'<text x="0" y="{height + 18}" font-size="11">epoch 1</text>'
            f'<text x="{width - 40}" y="{height + 18}" font-size="11">epoch {len(points)}</text></svg>')


def _report_html(run_id: str, accuracy: float, macro_f1: float, matrix: list[list[int]],
                 history: list[dict[str, Any]]) -> str:
    curves = []
    for key, title in (("loss", "training loss"), ("val_loss", "validation loss"),
                       ("val_accuracy", "validation accuracy")):
        points = [float(h[key]) for h in history if h.get(key) is not None]
        if points:
            curves.append(f"<h3>{title}</h3>{_curve(points)}")
    header = "".join(f"<th>{i}</th>" for i in range(len(matrix)))
    rows = "".join(f"<tr><th>{i}</th>" + "".join(f"<td>{v}</td>" for v in row) + "</tr>" for i, row in enumerate(matrix))
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>kubeml evaluation</title>"
        "<style>body{font-family:sans-serif}td,th{padding:2px 6px;text-align:right}</style></head><body>"
        f"<h2>Run {html.escape(run_id)}</h2>"
        f"<p>accuracy <b>{accuracy:.4f}</b> · macro-F1 <b>{macro_f1:.4f}</b> on the held-out split</p>"
        + "".join(curves)
        + f"<h3>confusion matrix (rows: true, columns: predicted)</h3><table><tr><th></th>{header}</tr>{rows}</table>"
        "</body></html>"
    )


def metric_of(artifact: Any, name: str) -> float:
    """One metric of a ``Metrics`` artifact written by :func:`write_evaluation`."""
    try:
        return float(artifact.metadata[name])
    except KeyError:
        raise ConfigError(f"the Metrics artifact {artifact.path} has no {name!r}: it was not written by kubeml's "
                          "evaluate step") from None
