"""The pipeline's stages as plain library functions (the application layer).

Each KFP component in ``components/`` is a thin wrapper that calls one function here, so the
logic lives once and runs the same under ``kfp.local``, on a Kubeflow cluster, or called
directly from Python. Every stage takes the environment config as JSON (a KFP parameter),
records itself in the run ledger, and returns plain values. The stages are the only place
where training and serving meet; each picks its capability by configuration
(``training.target``, ``serving.target``), never by a fork in the code.
"""

from kubeml.pipelines.stages._common import RetryPolicy
from kubeml.pipelines.stages.deploy import deploy_stage
from kubeml.pipelines.stages.evaluate import evaluate_stage
from kubeml.pipelines.stages.gate import gate_stage
from kubeml.pipelines.stages.ingest import ingest_stage
from kubeml.pipelines.stages.register import register_stage
from kubeml.pipelines.stages.train import train_stage
from kubeml.pipelines.stages.validate import validate_stage

__all__ = [
    "RetryPolicy",
    "deploy_stage",
    "evaluate_stage",
    "gate_stage",
    "ingest_stage",
    "register_stage",
    "train_stage",
    "validate_stage",
]
