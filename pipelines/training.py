"""The training pipeline: ingest -> validate -> train -> evaluate -> gate -> register -> deploy.

The same definition runs under ``kfp.local`` (see :mod:`kubeml.pipelines.local`) and,
compiled to IR YAML, on a Kubeflow Pipelines backend. Register and deploy sit inside
``dsl.If`` on the gate's verdict: a model below the thresholds is never registered.
"""

from kfp import dsl

from kubeml.components.deploy.component import deploy
from kubeml.components.evaluate.component import evaluate
from kubeml.components.gate.component import gate
from kubeml.components.ingest.component import ingest
from kubeml.components.register.component import register
from kubeml.components.train.component import train
from kubeml.components.validate.component import validate

__all__ = ["PIPELINE_NAME", "training_pipeline"]

PIPELINE_NAME = "kubeml-training"


@dsl.pipeline(name=PIPELINE_NAME, description="kubeml end-to-end training pipeline")
def training_pipeline(config_json: str, run_id: str, code_version: str = "unknown"):
    ing = ingest(config_json=config_json, run_id=run_id).set_display_name("ingest")
    val = validate(
        config_json=config_json, run_id=run_id, dataset=ing.outputs["dataset"], version=ing.outputs["version"]
    ).set_display_name("validate")
    tr = (
        train(config_json=config_json, run_id=run_id, dataset=ing.outputs["dataset"], version=ing.outputs["version"])
        .after(val)
        .set_display_name("train")
        # Two layers of retry. The stage retries retryable errors itself, with a backoff
        # (kubeml.pipelines.stages.TRAIN_RETRY): a local run continues from its checkpoints,
        # and on a cluster it adopts (or, if it failed, replaces) the RayJob / TrainingJob by
        # name. KFP's retry is for a step pod lost with no error recorded (node drained, spot
        # reclaimed, OOM-killed): KFP retries every failed attempt, so a retried attempt
        # whose previous one recorded a non-retryable error fails at once with that error
        # (see kubeml.pipelines.stages.run_stage), after a short backoff only.
        .set_retry(num_retries=2, backoff_duration="5s", backoff_factor=2.0)
    )
    ev = evaluate(
        config_json=config_json,
        run_id=run_id,
        dataset=ing.outputs["dataset"],
        version=ing.outputs["version"],
        bundle_key=tr.output,
    ).set_display_name("evaluate")
    verdict = gate(
        config_json=config_json, run_id=run_id, accuracy=ev.outputs["accuracy"], macro_f1=ev.outputs["macro_f1"]
    ).set_display_name("gate")
    with dsl.If(verdict.output == "passed", name="gate-passed"):
        reg = register(
            config_json=config_json,
            run_id=run_id,
            dataset=ing.outputs["dataset"],
            version=ing.outputs["version"],
            bundle_key=tr.output,
            code_version=code_version,
        ).set_display_name("register")
        deploy(config_json=config_json, run_id=run_id, model_version=reg.output).set_display_name("deploy")
