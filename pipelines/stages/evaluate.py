"""evaluate: score the trained bundle on the held-out split; the report goes to the store."""

from __future__ import annotations

import json

from kubeml.pipelines.stages._bundles import local_bundle
from kubeml.pipelines.stages._common import open_stage, run_stage

__all__ = ["evaluate_stage"]


def evaluate_stage(config_json: str, run_id: str, dataset: str, version: str, bundle_key: str) -> tuple[float, float]:
    """Returns ``(accuracy, macro_f1)`` on the held-out split; writes the full report to the ledger."""
    from kubeml.bundle import load_bundle
    from kubeml.data import load_dataset
    from kubeml.evaluation import evaluate_model

    ctx = open_stage(config_json, run_id)

    def body(rec, _attempt):
        ds = load_dataset(ctx.store, dataset, version)
        model, spec = load_bundle(local_bundle(ctx.cfg, ctx.store, bundle_key, run_id))
        x, y = ds.test()
        report = evaluate_model(model, x, y, num_classes=len(spec.classes))
        ctx.store.put_text(
            f"runs/{run_id}/evaluation.json",
            json.dumps(
                {**report.metrics(), "confusion_matrix": report.confusion_matrix, "predictions": report.predictions},
            ),
        )
        rec.outputs = {**report.metrics(), "confusion_matrix": report.confusion_matrix}
        rec.message = f"accuracy {report.accuracy:.4f}, macro-F1 {report.macro_f1:.4f} on {report.samples} held-out samples"
        return report.accuracy, report.macro_f1

    return run_stage("evaluate", ctx, body)
