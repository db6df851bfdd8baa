"""deploy: serves an approved version and smoke-tests it; returns the V2 infer URL ("" if pending)."""

from kfp import dsl

from kubeml.components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def deploy(config_json: str, run_id: str, model_version: int) -> str:
    from kubeml.pipelines.stages import deploy_stage

    return deploy_stage(config_json, run_id, model_version)
