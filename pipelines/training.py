"""The training pipeline: ingest -> validate -> train -> evaluate -> gate -> register -> deploy.

The steps pass typed artifacts (:mod:`kubeml.pipelines.stages.artifacts`): the
configuration, a ``Dataset``, a ``Model``, ``Metrics``, ``ClassificationMetrics`` and an
HTML report, which the Kubeflow UI draws and links by lineage.

The same definition runs under ``kfp.local`` (see :mod:`kubeml.pipelines.local`) and,
compiled to IR YAML, on a Kubeflow Pipelines backend. Register and deploy sit inside
``dsl.If`` on the gate's verdict: a model below the thresholds is never registered.

:func:`build_training_pipeline` makes it with each task's pod resources and placement
(``kubeflow.tasks``) for a cluster; ``training_pipeline`` is the same DAG without them.
Caching, the same on both: a task whose inputs (run id included) are the same as an
earlier execution's reuses its outputs, which happens when a run id is submitted again
after a failure. Ingest, validate, evaluate and gate are pure functions of their inputs
(and configure) are cached; train, register and deploy act on the world (a RayJob, the registry, the
served model), keep their own idempotency through the run ledger, and always execute.
"""

# No postponed annotations here: kfp reads the pipeline function's parameter types.
from collections.abc import Callable
from typing import Any, Optional

from kfp import dsl

from kubeml.components.configure.component import configure
from kubeml.components.deploy.component import deploy
from kubeml.components.evaluate.component import evaluate
from kubeml.components.gate.component import gate
from kubeml.components.ingest.component import ingest
from kubeml.components.register.component import register
from kubeml.components.train.component import train
from kubeml.components.validate.component import validate

__all__ = ["CACHED_STAGES", "PIPELINE_NAME", "build_training_pipeline", "training_pipeline"]

PIPELINE_NAME = "kubeml-training"
#: The stages whose executions KFP may reuse (see the module docstring).
CACHED_STAGES = frozenset({"configure", "ingest", "validate", "evaluate", "gate"})


def _placed(task: dsl.PipelineTask, stage: str, tasks: Optional[Any]) -> dsl.PipelineTask:
    """Name, caching and (with ``tasks``, a :class:`~kubeml.config.KubeflowConfig`) the pod's
    requests, limits, GPUs, node selector and tolerations of ``stage``'s task."""
    task.set_display_name(stage).set_caching_options(stage in CACHED_STAGES)
    if tasks is None:
        return task
    from kfp import kubernetes

    settings = tasks.task(stage)
    for setter, value in ((task.set_cpu_request, settings.cpu), (task.set_memory_request, settings.memory),
                          (task.set_cpu_limit, settings.cpu_limit or settings.cpu),
                          (task.set_memory_limit, settings.memory_limit or settings.memory)):
        if value is not None:
            setter(str(value))
    if settings.gpu:
        task.set_accelerator_type(settings.gpu_type or "nvidia.com/gpu").set_accelerator_limit(settings.gpu)
    for key, value in (settings.node_selector or {}).items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for toleration in settings.tolerations or ():
        kubernetes.add_toleration(task, key=toleration.get("key"), operator=toleration.get("operator", "Equal"),
                                  value=toleration.get("value"), effect=toleration.get("effect"))
    return task


def build_training_pipeline(tasks: Optional[Any] = None) -> Callable[..., Any]:
    """The training pipeline, with ``tasks`` (a :class:`~kubeml.config.KubeflowConfig`) placing its pods."""

    @dsl.pipeline(name=PIPELINE_NAME, description="kubeml end-to-end training pipeline")
    def training_pipeline(config_json: str, run_id: str, code_version: str = "unknown"):
        _define(config_json, run_id, code_version, tasks)

    return training_pipeline


def _define(config_json: Any, run_id: Any, code_version: Any, tasks: Optional[Any]) -> None:
    def place(task: dsl.PipelineTask, stage: str) -> dsl.PipelineTask:
        return _placed(task, stage, tasks)

    # The configuration travels as one small artifact; every step reads it.
    config = place(configure(config_json=config_json), "configure").outputs["config"]
    data = place(ingest(config=config, run_id=run_id), "ingest").outputs["data"]
    val = place(validate(config=config, run_id=run_id, data=data), "validate")
    tr = (
        place(train(config=config, run_id=run_id, data=data), "train")
        .after(val)
        # Two layers of retry. The stage retries retryable errors itself, with a backoff
        # (kubeml.pipelines.stages.TRAIN_RETRY): a local run continues from its checkpoints,
        # and on a cluster it adopts (or, if it failed, replaces) the RayJob / TrainingJob by
        # name. KFP's retry is for a step pod lost with no error recorded (node drained, spot
        # reclaimed, OOM-killed): KFP retries every failed attempt, so a retried attempt
        # whose previous one recorded a non-retryable error fails at once with that error
        # (see kubeml.pipelines.stages.run_stage), after a short backoff only.
        .set_retry(num_retries=2, backoff_duration="5s", backoff_factor=2.0)
    )
    model = tr.outputs["model"]
    ev = place(evaluate(config=config, run_id=run_id, data=data, model=model), "evaluate")
    verdict = place(gate(config=config, run_id=run_id, metrics=ev.outputs["metrics"]), "gate")
    with dsl.If(verdict.output == "passed", name="gate-passed"):
        reg = place(register(config=config, run_id=run_id, data=data, model=model, metrics=ev.outputs["metrics"],
                             code_version=code_version), "register")
        place(deploy(config=config, run_id=run_id, model=model, model_version=reg.output), "deploy")


#: The pipeline as ``kfp.local`` runs it: no pod settings (there are no pods).
training_pipeline = build_training_pipeline()
