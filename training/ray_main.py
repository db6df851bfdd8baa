"""Entry point of a training job on a cluster: ``python -m kubeml.training.ray_main``.

The KubeRay ``RayJob`` entrypoint and the SageMaker entry script both run this. The job's
environment carries everything :func:`~kubeml.training.fit.fit` needs:

- ``KUBEML_CONFIG``: the environment configuration as JSON (``EnvironmentConfig``);
- ``KUBEML_RUN_ID``, ``KUBEML_DATASET``, ``KUBEML_DATASET_VERSION``;
- ``KUBEML_RESUME``: ``1`` to require checkpoints to continue from (unset: continue if any).

Checkpoints go to the configured artifact store (S3 on a cluster), so a restarted job,
on a new spot node or a new SageMaker instance, continues from the last one. The model
bundle and the run's result record go there too (``models/RUN_ID/bundle``,
``runs/RUN_ID/train/result.json``): the train step that launched the job reads them back
(the contract is in :mod:`kubeml.training.launchers._contract`).
"""

from __future__ import annotations

import json
import os
import sys

__all__ = ["main"]


def main(environ: dict[str, str] | None = None) -> int:
    from kubeml.config import EnvironmentConfig
    from kubeml.errors import KubemlError
    from kubeml.training.launchers import write_result
    from kubeml.training.fit import fit

    env = os.environ if environ is None else environ
    missing = [k for k in ("KUBEML_CONFIG", "KUBEML_RUN_ID", "KUBEML_DATASET", "KUBEML_DATASET_VERSION") if not env.get(k)]
    if missing:
        print(f"kubeml.training.ray_main: missing environment variables: {', '.join(missing)}", file=sys.stderr)
        return 2
    cfg = EnvironmentConfig.model_validate_json(env["KUBEML_CONFIG"])
    store = cfg.artifact_store.open()
    try:
        result = fit(cfg, store, dataset=env["KUBEML_DATASET"], dataset_version=env["KUBEML_DATASET_VERSION"],
                     run_id=env["KUBEML_RUN_ID"], resume=True if env.get("KUBEML_RESUME") == "1" else None)
        write_result(store, result)
    except KubemlError as exc:
        print(f"training failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"run_id": result.run_id, "bundle_key": result.bundle_key, "epochs": result.epochs,
                      "checkpoint_uri": result.checkpoint_uri, "time_to_first_step_s": result.time_to_first_step_s}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
