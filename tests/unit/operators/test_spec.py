"""Tenant spec validation (pure): what the operator refuses, and why."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import yaml

from kubeml.operators._spec import RESERVED_NAMES, InvalidTenant, Quota, parse_tenant

CRD = Path(__file__).resolve().parents[3] / "charts" / "kubeml-platform" / "crds" / "tenants.kubeml.io.yaml"


def tenant(name: str = "team-a", **spec) -> dict:
    return {"apiVersion": "kubeml.io/v1alpha1", "kind": "Tenant",
            "metadata": {"name": name, "uid": "u-1"}, "spec": {"owners": ["alice"], **spec}}


def reason_for(body: dict) -> str:
    with pytest.raises(InvalidTenant) as excinfo:
        parse_tenant(body)
    return excinfo.value.reason


def test_minimal_tenant_gets_default_quota_and_owner_is_admin():
    spec = parse_tenant(tenant())

    assert spec.namespace == "team-a"
    assert spec.quota == Quota()
    assert spec.subjects("admin") == ("alice",)
    assert spec.subjects("viewer") == ()


def test_members_are_grouped_by_role_and_sorted():
    spec = parse_tenant(tenant(members=[{"name": "zoe", "role": "viewer"}, {"name": "bob", "role": "editor"},
                                        {"name": "amy", "role": "viewer"}, {"name": "dan", "role": "admin"}]))

    assert spec.subjects("viewer") == ("amy", "zoe")
    assert spec.subjects("editor") == ("bob",)
    assert spec.subjects("admin") == ("alice", "dan")


@pytest.mark.parametrize("name", ["default", "kube-system", "kube-public", "kubeflow", "kubeml-system",
                                  "istio-system", "openshift-x"])
def test_reserved_namespace_names_are_rejected(name):
    assert reason_for(tenant(name)) == "ReservedName"


@pytest.mark.parametrize("name", ["Team-A", "team_a", "a" * 64, "team.a", "-a", "a-", ""])
def test_names_that_are_not_dns_labels_are_rejected(name):
    assert reason_for(tenant(name)) == "InvalidName"


@pytest.mark.parametrize("owner,reason", [
    ("*", "InvalidUser"), ("system:masters", "ForbiddenUser"),
    ("system:serviceaccount:kube-system:default", "ForbiddenUser"), ("al*ce", "InvalidUser"),
    ("", "InvalidUser"), (7, "InvalidUser"),
])
def test_wildcard_and_system_owners_are_rejected(owner, reason):
    assert reason_for(tenant(owners=[owner])) == reason


def test_system_member_is_rejected():
    assert reason_for(tenant(members=[{"name": "system:masters", "role": "viewer"}])) == "ForbiddenUser"


def test_unknown_member_role_is_rejected():
    assert reason_for(tenant(members=[{"name": "bob", "role": "root"}])) == "InvalidMembers"


@pytest.mark.parametrize("quota", [
    {"cpu": "-1"}, {"cpu": "4097"}, {"cpu": "lots"}, {"memory": "65Ti"}, {"memory": "-1Gi"},
    {"nvidia.com/gpu": -1}, {"nvidia.com/gpu": 513}, {"pods": 10001}, {"pods": "10"}, {"pods": True},
    {"disk": "1Ti"},
])
def test_negative_absurd_or_malformed_quotas_are_rejected(quota):
    assert reason_for(tenant(quota=quota)) == "InvalidQuota"


def test_quotas_at_the_bounds_are_accepted():
    spec = parse_tenant(tenant(quota={"cpu": "4096", "memory": "64Ti", "nvidia.com/gpu": 512, "pods": 0}))

    assert spec.quota == Quota(cpu="4096", memory="64Ti", gpus=512, pods=0)


@pytest.mark.parametrize("arn", [
    "arn:aws:iam::12345678901:role/x", "arn:aws:s3:::bucket", "arn:aws:iam::123456789012:user/x",
    "arn:aws:iam::123456789012:role/", "role/x",
])
def test_malformed_iam_role_arns_are_rejected(arn):
    assert reason_for(tenant(iamRoleArn=arn)) == "InvalidIamRoleArn"


@pytest.mark.parametrize("arn", ["arn:aws:iam::123456789012:role/team-a",
                                 "arn:aws-cn:iam::123456789012:role/ml/team-a@x"])
def test_well_formed_iam_role_arns_are_accepted(arn):
    assert parse_tenant(tenant(iamRoleArn=arn)).iam_role_arn == arn


def test_bad_s3_prefix_and_cost_center_are_rejected():
    assert reason_for(tenant(s3Prefix="http://bucket/x")) == "InvalidS3Prefix"
    assert reason_for(tenant(costCenter="a b")) == "InvalidCostCenter"


def test_invalid_tenant_pickles_with_its_reason():
    error = pickle.loads(pickle.dumps(InvalidTenant("InvalidQuota", "too big")))

    assert (error.reason, error.message) == ("InvalidQuota", "too big")


def test_crd_reserved_names_match_the_operator():
    crd = yaml.safe_load(CRD.read_text())
    rules = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["x-kubernetes-validations"]
    listed = set(re.findall(r"'([a-z0-9-]+)'", rules[1]["rule"].split("]")[0]))

    assert listed == set(RESERVED_NAMES)


def test_deletion_policy_defaults_to_retain_and_only_delete_deletes():
    crd_property = yaml.safe_load(CRD.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"][
        "properties"]["spec"]["properties"]["deletionPolicy"]

    assert parse_tenant(tenant()).deletion_policy == "Retain"
    assert parse_tenant(tenant(deletionPolicy="Delete")).deletion_policy == "Delete"
    assert (crd_property["default"], crd_property["enum"]) == ("Retain", ["Retain", "Delete"])
    for bad in ("delete", "", "Orphan", True):
        assert reason_for(tenant(deletionPolicy=bad)) == "InvalidDeletionPolicy"
