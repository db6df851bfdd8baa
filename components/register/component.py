"""register: the bundle becomes the next MLflow model version, tagged with provenance and approval."""

from kfp import dsl

from kubeml.components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register(
    config: dsl.Input[dsl.Artifact],
    run_id: str,
    data: dsl.Input[dsl.Dataset],
    model: dsl.Input[dsl.Model],
    metrics: dsl.Input[dsl.Metrics],
    code_version: str,
) -> int:
    from kubeml.pipelines.stages import register_stage
    from kubeml.pipelines.stages.artifacts import config_json_of, dataset_of, model_of

    # The metrics artifact is an input for lineage; the stage reads the evaluation it records.
    del metrics
    return register_stage(config_json_of(config), run_id, *dataset_of(data), model_of(model), code_version)
