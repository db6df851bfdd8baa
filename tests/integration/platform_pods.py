"""The pods kubeml generates, as the controllers (KServe, KubeRay) would create them.

Shared by the admission tests (``test_security.py``: Pod Security ``restricted`` by dry-run)
and the real-node tests (``test_images_run.py``: the same security settings in a running
container).
"""

from __future__ import annotations

__all__ = ["as_pod", "platform_pods"]

_POD_FIELDS = ("containers", "securityContext", "nodeSelector", "tolerations", "volumes",
               "terminationGracePeriodSeconds")


def as_pod(name: str, spec: dict) -> dict:
    """The Pod a controller (KServe, KubeRay) would create from ``spec``: its PodSpec fields."""
    return {"metadata": {"name": name}, "spec": {k: v for k, v in spec.items() if k in _POD_FIELDS}}


def platform_pods(namespace: str) -> dict[str, dict]:
    from kubeml.config import KubemlConfig
    from kubeml.serving.inferenceservice import PredictorConfig, predictor_spec
    from kubeml.training.launchers.kuberay import rayjob_manifest

    cfg = KubemlConfig(environments={"prod": {
        "artifact_store": {"uri": "s3://ml-artifacts/kubeml"},
        "training": {"workers": 2, "launcher": {"namespace": namespace}},
    }}).environment("prod")
    job = rayjob_manifest(cfg, run_id="pss", dataset="digits", dataset_version="v-1")
    cluster = job["spec"]["rayClusterSpec"]
    predictor = predictor_spec(PredictorConfig(image="kubeml/kubeml-server:0.1.0", storage_uri="s3://m/digits/1",
                                               model_name="digits", version="1", grpc=True))
    return {
        "predictor": as_pod("predictor", predictor),
        "ray-head": as_pod("ray-head", cluster["headGroupSpec"]["template"]["spec"]),
        "ray-worker": as_pod("ray-worker", cluster["workerGroupSpecs"][0]["template"]["spec"]),
    }
