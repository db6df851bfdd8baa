"""gate: compares the evaluation with the environment's thresholds; outputs "passed" or "failed"."""

from kfp import dsl

from kubeml.components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def gate(config: dsl.Input[dsl.Artifact], run_id: str, metrics: dsl.Input[dsl.Metrics]) -> str:
    from kubeml.pipelines.stages import gate_stage
    from kubeml.pipelines.stages.artifacts import config_json_of, metric_of

    return gate_stage(config_json_of(config), run_id, metric_of(metrics, "accuracy"), metric_of(metrics, "macro_f1"))
