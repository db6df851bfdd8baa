"""Third-party CRDs are installed with their upstream schemas, so the apiserver validates them.

Each kind gets one object that upstream's documentation would accept and one with a schema
violation; a 422 from the apiserver (not from kubeml code) proves the schema is the real one.
"""

from __future__ import annotations

import copy
import json

import pytest
from kubernetes.client import CustomObjectsApi
from kubernetes.client.exceptions import ApiException

pytestmark = pytest.mark.integration

RAY_IMAGE = "rayproject/ray:2.50.0"

RAYJOB = {
    "apiVersion": "ray.io/v1",
    "kind": "RayJob",
    "metadata": {"name": "train-digits"},
    "spec": {
        "entrypoint": "python -m kubeml.training.ray_main",
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": 600,
        "rayClusterSpec": {
            "rayVersion": "2.50.0",
            "headGroupSpec": {
                "rayStartParams": {},
                "template": {"spec": {"containers": [{"name": "ray-head", "image": RAY_IMAGE}]}},
            },
            "workerGroupSpecs": [
                {
                    "groupName": "gpu",
                    "replicas": 2,
                    "minReplicas": 0,
                    "maxReplicas": 4,
                    "rayStartParams": {},
                    "template": {
                        "spec": {
                            "containers": [{
                                "name": "ray-worker",
                                "image": RAY_IMAGE,
                                "resources": {"limits": {"nvidia.com/gpu": "1"}},
                            }],
                            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
                        }
                    },
                }
            ],
        },
    },
}

INFERENCE_SERVICE = {
    "apiVersion": "serving.kserve.io/v1beta1",
    "kind": "InferenceService",
    "metadata": {"name": "digits"},
    "spec": {
        "predictor": {
            "minReplicas": 1,
            "maxReplicas": 3,
            "canaryTrafficPercent": 10,
            "model": {
                "modelFormat": {"name": "onnx"},
                "storageUri": "s3://kubeml-models/digits/3",
                "resources": {"limits": {"cpu": "1", "memory": "2Gi"}},
            },
        }
    },
}

TRAINING_JOB = {
    "apiVersion": "sagemaker.services.k8s.aws/v1alpha1",
    "kind": "TrainingJob",
    "metadata": {"name": "digits-p4d"},
    "spec": {
        "trainingJobName": "digits-p4d",
        "roleARN": "arn:aws:iam::123456789012:role/kubeml-sagemaker",
        "algorithmSpecification": {
            "trainingImage": "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-training:2.5-gpu-py311",
            "trainingInputMode": "File",
        },
        "outputDataConfig": {"s3OutputPath": "s3://kubeml-models/sagemaker/"},
        "resourceConfig": {"instanceCount": 1, "instanceType": "ml.p4d.24xlarge", "volumeSizeInGB": 100},
        "stoppingCondition": {"maxRuntimeInSeconds": 86400},
        "hyperParameters": {"epochs": "5"},
    },
}

SERVICE_MONITOR = {
    "apiVersion": "monitoring.coreos.com/v1",
    "kind": "ServiceMonitor",
    "metadata": {"name": "digits"},
    "spec": {"selector": {"matchLabels": {"app": "digits"}}, "endpoints": [{"port": "metrics", "interval": "30s"}]},
}

PROMETHEUS_RULE = {
    "apiVersion": "monitoring.coreos.com/v1",
    "kind": "PrometheusRule",
    "metadata": {"name": "digits"},
    "spec": {"groups": [{"name": "digits", "rules": [
        {"alert": "HighErrorRate", "expr": "rate(errors_total[5m]) > 0.05", "for": "5m"}]}]},
}


def _with(obj: dict, path: str, value) -> dict:
    """A deep copy of ``obj`` with the dotted ``path`` set to ``value`` (None deletes it)."""
    result = copy.deepcopy(obj)
    *parents, leaf = path.split(".")
    node = result
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is None:
        del node[leaf]
    else:
        node[leaf] = value
    return result


def _contains(actual, expected) -> bool:
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(k in actual and _contains(actual[k], v) for k, v in expected.items())
    if isinstance(expected, list):
        return isinstance(actual, list) and len(actual) == len(expected) and all(
            _contains(a, e) for a, e in zip(actual, expected))
    return actual == expected


def _create(admin, namespace: str, obj: dict) -> dict:
    group, version = obj["apiVersion"].split("/")
    plural = obj["kind"].lower() + "s"
    return CustomObjectsApi(admin).create_namespaced_custom_object(group, version, namespace, plural, obj)


VALID = {"RayJob": RAYJOB, "InferenceService": INFERENCE_SERVICE, "TrainingJob": TRAINING_JOB,
         "ServiceMonitor": SERVICE_MONITOR, "PrometheusRule": PROMETHEUS_RULE}

# (object, the field the apiserver must name in its rejection)
INVALID = {
    "RayJob: worker replicas not an integer": (
        _with(RAYJOB, "spec.rayClusterSpec.workerGroupSpecs.0.replicas", "two"), "replicas"),
    "RayJob: worker group without groupName": (
        _with(RAYJOB, "spec.rayClusterSpec.workerGroupSpecs.0.groupName", None), "groupName"),
    "InferenceService: minReplicas not an integer": (
        _with(INFERENCE_SERVICE, "spec.predictor.minReplicas", "one"), "minReplicas"),
    "InferenceService: modelFormat without a name": (
        _with(INFERENCE_SERVICE, "spec.predictor.model.modelFormat", {"version": "1"}), "modelFormat.name"),
    "TrainingJob: no roleARN": (_with(TRAINING_JOB, "spec.roleARN", None), "roleARN"),
    "TrainingJob: instanceCount not an integer": (
        _with(TRAINING_JOB, "spec.resourceConfig.instanceCount", "many"), "instanceCount"),
    "ServiceMonitor: endpoints not a list": (_with(SERVICE_MONITOR, "spec.endpoints", {"port": "x"}), "endpoints"),
}


@pytest.mark.parametrize("kind", sorted(VALID))
def test_valid_object_is_accepted(admin, namespace, kind):
    created = _create(admin, namespace, VALID[kind])

    assert created["metadata"]["uid"]
    # Pruning would silently drop fields the schema does not know: every field sent must
    # come back (the schema's defaults may add more).
    assert _contains(created["spec"], VALID[kind]["spec"])


@pytest.mark.parametrize("case", sorted(INVALID))
def test_schema_violation_is_rejected_by_the_apiserver(admin, namespace, case):
    obj, field = INVALID[case]

    with pytest.raises(ApiException) as excinfo:
        _create(admin, namespace, obj)

    assert excinfo.value.status == 422
    body = json.loads(excinfo.value.body)
    assert body["reason"] == "Invalid"
    assert field in body["message"]


def test_kubeflow_profile_is_cluster_scoped_and_validated(admin):
    api = CustomObjectsApi(admin)
    profile = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "Profile",
        "metadata": {"name": "team-vision-test"},
        "spec": {
            "owner": {"kind": "User", "name": "alice@example.com"},
            "resourceQuotaSpec": {"hard": {"requests.nvidia.com/gpu": "8"}},
        },
    }
    try:
        created = api.create_cluster_custom_object("kubeflow.org", "v1", "profiles", profile)
        assert created["spec"]["owner"]["name"] == "alice@example.com"
        bad = _with(profile, "spec.owner", "alice")
        bad["metadata"]["name"] = "team-vision-bad"
        with pytest.raises(ApiException) as excinfo:
            api.create_cluster_custom_object("kubeflow.org", "v1", "profiles", bad)
        assert excinfo.value.status == 422
    finally:
        try:
            api.delete_cluster_custom_object("kubeflow.org", "v1", "profiles", "team-vision-test")
        except ApiException:
            pass
