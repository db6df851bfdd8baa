"""ingest: read the configured dataset, version it by content, store it."""

from __future__ import annotations

from kubeml.pipelines.stages._common import open_stage, run_stage

__all__ = ["ingest_stage"]


def ingest_stage(config_json: str, run_id: str) -> tuple[str, str]:
    """Returns ``(dataset name, dataset version)``."""
    from kubeml.data import ingest

    ctx = open_stage(config_json, run_id)

    def body(rec, _attempt):
        m = ingest(ctx.store, ctx.cfg.data)
        rec.outputs = {"dataset": m.name, "version": m.version, "rows": m.rows, "train_rows": m.train_rows,
                       "test_rows": m.test_rows}
        rec.message = f"{m.name}@{m.version} ({m.rows} rows)"
        return m.name, m.version

    return run_stage("ingest", ctx, body)
