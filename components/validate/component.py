"""validate: schema, value range, completeness and class balance; a violation fails the run."""

from kfp import dsl

from kubeml.components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def validate(config_json: str, run_id: str, dataset: str, version: str) -> str:
    from kubeml.pipelines.stages import validate_stage

    return validate_stage(config_json, run_id, dataset, version)
