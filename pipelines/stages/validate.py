"""validate: check the dataset against its constraints; a violation stops the run."""

from __future__ import annotations

import json

from kubeml.pipelines.stages._common import open_stage, run_stage

__all__ = ["validate_stage"]


def validate_stage(config_json: str, run_id: str, dataset: str, version: str) -> str:
    """Raises DataValidationError (failing the run) listing every failed constraint; returns the report as JSON."""
    from kubeml.data import load_dataset, validate

    ctx = open_stage(config_json, run_id)

    def body(rec, _attempt):
        ds = load_dataset(ctx.store, dataset, version)
        report = validate(ds, ctx.cfg.data.validation)
        rec.outputs = report
        rec.message = f"{report['rows']} rows, {report['features']} features: all constraints hold"
        return json.dumps(report)

    return run_stage("validate", ctx, body)
