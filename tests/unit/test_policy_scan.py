"""The policy scan of everything kubeml deploys (``make policy``; part of ``make test``).

kube-score (pinned in hack/policy/versions.env, built by ``make policy-assets``) scores the
rendered chart, the three kustomize overlays and the manifests kubeml generates; every high
finding must be fixed or waived with a reason in policy/waivers.yaml, and every waiver must
still match a finding. Needs helm and kubectl from the control-plane assets; no network.
"""

from __future__ import annotations

import pytest
from kubeml.errors import AssetsMissing
from kubeml.testing.cluster import find_assets
from kubeml.testing.policy import (
    evaluate,
    load_waivers,
    project_sources,
    scan,
)



@pytest.fixture(scope="module")
def sources():
    try:
        assets = find_assets()
    except AssetsMissing as exc:
        pytest.skip(f"helm/kubectl not built: {exc}")
    return project_sources(assets.binary("helm"), assets.binary("kubectl"))


@pytest.fixture(scope="module")
def scanned(scanner, sources):
    return scan(sources, scanner)


def test_every_source_and_every_pod_template_is_scanned(scanned):
    _, scored = scanned

    assert set(scored) == {"chart", "overlays/dev", "overlays/staging", "overlays/prod", "generated"}
    for source in ("chart", "overlays/dev", "overlays/staging", "overlays/prod"):
        assert "Deployment/kubeml-kubeml-platform-operator" in scored[source], source
    # The pod templates inside the custom resources: Ray head and workers, each predictor and
    # canary; and the tenant's NetworkPolicies, which the pods are checked against.
    assert {"Pod/kubeml-policy-scan-head", "Pod/kubeml-policy-scan-gpu-worker", "Deployment/digits-predictor",
            "Deployment/digits-kn-predictor", "Deployment/digits-std-predictor",
            "Deployment/digits-std-canary", "NetworkPolicy/kubeml-default-deny"} <= set(scored["generated"])


def test_no_unwaived_high_finding_and_no_stale_waiver(scanned):
    findings, _ = scanned
    verdict = evaluate(findings, load_waivers())

    assert verdict.ok, verdict.report()
