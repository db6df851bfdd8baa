"""configure: the environment's configuration as an artifact, the one input every later step reads."""

from kfp import dsl

from kubeml.components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def configure(config_json: str, config: dsl.Output[dsl.Artifact]):
    from kubeml.pipelines.stages.artifacts import write_config

    write_config(config_json, config)
