"""gate: compares the evaluation with the environment's thresholds; outputs "passed" or "failed"."""

from kfp import dsl

from kubeml.components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def gate(config_json: str, run_id: str, accuracy: float, macro_f1: float) -> str:
    from kubeml.pipelines.stages import gate_stage

    return gate_stage(config_json, run_id, accuracy, macro_f1)
