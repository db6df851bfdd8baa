"""InferenceService manifests and the cluster rollout backend against a real apiserver.

The apiserver validates every manifest against the upstream KServe CRD schema
(server-side dry-run), and the cluster backend's patches are applied to a real object.
No KServe controller runs here, so readiness waits are off.
"""

from __future__ import annotations

import pytest
from kubernetes.client import CustomObjectsApi
from kubernetes.client.exceptions import ApiException

from kubeml.serving.inferenceservice import (
    PayloadLoggerConfig,
    PredictorConfig,
    Resources,
    inference_service,
    with_canary,
)
from kubeml.serving.rollout.cluster import InferenceServiceBackend

pytestmark = pytest.mark.integration

GROUP, VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"


def _skip_without_spec_canary(admin) -> None:
    """Standard-mode canaries need the CRD of KServe >= 0.20 (``spec.canary``)."""
    from kubernetes.client import ApiextensionsV1Api

    crd = ApiextensionsV1Api(admin).read_custom_resource_definition(f"{PLURAL}.{GROUP}")
    version = next(v for v in crd.spec.versions if v.name == VERSION)
    if "canary" not in version.schema.open_apiv3_schema.properties["spec"].properties:
        pytest.skip("the installed InferenceService CRD predates spec.canary (KServe >= 0.20)")
IMAGE = "ghcr.io/kubeml/kubeml-server:0.1.0"


def _predictor(version: str, **kwargs) -> PredictorConfig:
    return PredictorConfig(
        image=IMAGE,
        storage_uri=f"s3://kubeml-models/digits/{version}",
        model_name="digits",
        version=version,
        payload_logger=PayloadLoggerConfig("http://kubeml-payloads.monitoring/"),
        service_account="kubeml-serving",
        **kwargs,
    )


@pytest.mark.parametrize("mode", ["knative", "standard"])
@pytest.mark.parametrize("gpus", [0, 1])
def test_manifests_pass_server_side_dry_run(admin, namespace, mode, gpus):
    if mode == "standard":
        _skip_without_spec_canary(admin)
    api = CustomObjectsApi(admin)
    stable = _predictor("3", resources=Resources(gpus=gpus), grpc=True)
    isvc = inference_service("digits", stable, mode=mode)
    canary = with_canary(isvc, _predictor("4", resources=Resources(gpus=gpus)), 10)
    for manifest in (isvc, canary):
        # Strict: an unknown field is an error, not silently pruned.
        created = api.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, manifest, dry_run="All", field_validation="Strict"
        )
        assert created["metadata"]["name"] == "digits"
    if mode == "knative":
        assert canary["spec"]["predictor"]["canaryTrafficPercent"] == 10
    else:
        assert canary["spec"]["canary"][0]["trafficPercent"] == 10


def test_schema_violation_is_rejected_by_the_apiserver(admin, namespace):
    api = CustomObjectsApi(admin)
    bad = inference_service("digits", _predictor("3"), mode="standard")
    bad["spec"]["predictor"]["minReplicas"] = "one"
    with pytest.raises(ApiException) as err:
        api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, bad, dry_run="All")
    assert err.value.status == 422


@pytest.mark.parametrize("mode", ["knative", "standard"])
def test_backend_patches_traffic_then_rolls_back(admin, namespace, mode):
    if mode == "standard":
        _skip_without_spec_canary(admin)
    api = CustomObjectsApi(admin)
    stable, canary = _predictor("3"), _predictor("4")
    api.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, inference_service("digits", stable, mode=mode)
    )
    backend = InferenceServiceBackend(
        admin, namespace, "digits", stable=stable, canary=canary, mode=mode,
        prometheus=None, wait_ready=False,
    )  # fmt: skip
    backend.start_canary()
    backend.set_traffic(weight=10, mirror=False)
    spec = backend.get()["spec"]
    if mode == "knative":
        assert spec["predictor"]["canaryTrafficPercent"] == 10
        assert "--model-version" in spec["predictor"]["containers"][0]["args"]
    else:
        assert spec["canary"][0]["trafficPercent"] == 10
        assert spec["predictor"]["labels"]["kubeml.io/version"] == "3"
    backend.rollback()
    spec = backend.get()["spec"]
    assert "canary" not in spec and "canaryTrafficPercent" not in spec["predictor"]
    assert spec["predictor"]["labels"]["kubeml.io/version"] == "3"


def test_standard_mode_promotion_makes_the_canary_the_predictor(admin, namespace):
    _skip_without_spec_canary(admin)
    api = CustomObjectsApi(admin)
    stable, canary = _predictor("3"), _predictor("4")
    api.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, inference_service("digits", stable, mode="standard")
    )
    backend = InferenceServiceBackend(
        admin, namespace, "digits", stable=stable, canary=canary, mode="standard",
        prometheus=None, wait_ready=False,
    )  # fmt: skip
    backend.start_canary()
    backend.set_traffic(weight=50, mirror=False)
    backend.promote()
    spec = backend.get()["spec"]
    assert "canary" not in spec
    assert spec["predictor"]["labels"]["kubeml.io/version"] == "4"
