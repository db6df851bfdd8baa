"""ingest: the source data set into the artifact store as a content-addressed version (a ``Dataset``)."""

from kfp import dsl

from kubeml.components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def ingest(config: dsl.Input[dsl.Artifact], run_id: str, data: dsl.Output[dsl.Dataset]):
    from kubeml.pipelines.stages import ingest_stage
    from kubeml.pipelines.stages.artifacts import config_json_of, write_dataset

    config_json = config_json_of(config)
    ingest_stage(config_json, run_id)
    write_dataset(config_json, run_id, data)
