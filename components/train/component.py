"""train: Ray Train TorchTrainer on the configured Ray cluster; returns the bundle's store key."""

from kfp import dsl

from kubeml.components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train(config_json: str, run_id: str, dataset: str, version: str) -> str:
    from kubeml.stages import train_stage

    return train_stage(config_json, run_id, dataset, version)
