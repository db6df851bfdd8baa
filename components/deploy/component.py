"""deploy: serves an approved version and smoke-tests it; returns the V2 infer URL ("" if pending)."""

from kfp import dsl

from kubeml.components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def deploy(config: dsl.Input[dsl.Artifact], run_id: str, model: dsl.Input[dsl.Model], model_version: int) -> str:
    from kubeml.pipelines.stages import deploy_stage
    from kubeml.pipelines.stages.artifacts import config_json_of

    # The model artifact is an input for lineage; the registry version names what is served.
    del model
    return deploy_stage(config_json_of(config), run_id, model_version)
