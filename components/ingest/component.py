"""ingest: the source data set into the artifact store as a content-addressed version."""

from typing import NamedTuple

from kfp import dsl

from kubeml.components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def ingest(config_json: str, run_id: str) -> NamedTuple("IngestOutputs", [("dataset", str), ("version", str)]):
    from collections import namedtuple

    from kubeml.pipelines.stages import ingest_stage

    name, version = ingest_stage(config_json, run_id)
    return namedtuple("IngestOutputs", ["dataset", "version"])(name, version)
