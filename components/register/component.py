"""register: the bundle becomes the next MLflow model version, tagged with provenance and approval."""

from kfp import dsl

from kubeml.components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register(config_json: str, run_id: str, dataset: str, version: str, bundle_key: str, code_version: str) -> int:
    from kubeml.pipelines.stages import register_stage

    return register_stage(config_json, run_id, dataset, version, bundle_key, code_version)
