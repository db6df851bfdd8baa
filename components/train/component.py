"""train: the environment's launcher trains the model; its ``Model`` artifact names the bundle's store key.

``training.target`` of the environment picks the launcher (see :func:`kubeml.pipelines.stages.train_stage`):
``local`` runs Ray Train in the step itself; ``kuberay`` / ``sagemaker`` make the step create a
KubeRay ``RayJob`` / ACK SageMaker ``TrainingJob`` and wait for it (KFP v2 has no ResourceOp),
then return the bundle key the job wrote in the S3 artifact store. On a cluster the step's
service account needs create, get and delete on those objects
(``kubeml.training.launchers.RBAC_RULES``); a retried step adopts the job it started, and a
cancelled run deletes it.
"""

from kfp import dsl

from kubeml.components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train(config: dsl.Input[dsl.Artifact], run_id: str, data: dsl.Input[dsl.Dataset], model: dsl.Output[dsl.Model]):
    from kubeml.pipelines.stages import train_stage
    from kubeml.pipelines.stages.artifacts import config_json_of, dataset_of, write_model

    config_json = config_json_of(config)
    train_stage(config_json, run_id, *dataset_of(data))
    write_model(config_json, run_id, model)
