"""validate: schema, value range, completeness and class balance; a violation fails the run."""

from kfp import dsl

from kubeml.components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def validate(config: dsl.Input[dsl.Artifact], run_id: str, data: dsl.Input[dsl.Dataset]) -> str:
    from kubeml.pipelines.stages import validate_stage
    from kubeml.pipelines.stages.artifacts import config_json_of, dataset_of

    return validate_stage(config_json_of(config), run_id, *dataset_of(data))
