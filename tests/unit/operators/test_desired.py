"""Desired state and drift detection (pure): the manifests a Tenant turns into."""

from __future__ import annotations

import copy

import pytest

from kubeml.operators import OperatorConfig, desired_children, parse_tenant, patch_for
from kubeml.operators._desired import Peer, namespaced_children
from kubeml.operators._diff import creatable, merge_patch

CONFIG = OperatorConfig()


def spec(**fields):
    body = {"metadata": {"name": "team-a", "uid": "uid-a"},
            "spec": {"owners": ["alice"], "members": [{"name": "bob", "role": "viewer"}], **fields}}
    return parse_tenant(body)


def by_kind(children, kind):
    return [c for c in children if c["kind"] == kind]


def test_every_child_is_owned_by_the_tenant_and_labelled():
    children = desired_children(spec(), CONFIG)

    assert {c["kind"] for c in children} == {"Namespace", "ResourceQuota", "LimitRange", "RoleBinding",
                                             "NetworkPolicy", "ServiceAccount", "Profile"}
    for child in children:
        meta = child["metadata"]
        assert meta["ownerReferences"] == [{"apiVersion": "kubeml.io/v1alpha1", "kind": "Tenant", "name": "team-a",
                                            "uid": "uid-a", "controller": True, "blockOwnerDeletion": True}]
        assert meta["labels"]["kubeml.io/tenant"] == "team-a"
        if child["kind"] not in ("Namespace", "Profile"):
            assert meta["namespace"] == "team-a"


def test_children_do_not_depend_on_the_spec():
    # A spec change must never leave an object of a kind the new spec no longer wants.
    names = lambda s: [(c["kind"], c["metadata"]["name"]) for c in desired_children(s, CONFIG)]  # noqa: E731

    assert names(spec()) == names(spec(iamRoleArn="arn:aws:iam::123456789012:role/a", members=[]))


def test_namespace_enforces_restricted_pod_security_at_a_pinned_version():
    ns = by_kind(desired_children(spec(costCenter="cc-42"), OperatorConfig(pod_security_version="v1.31")),
                 "Namespace")[0]
    labels = ns["metadata"]["labels"]

    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert labels["pod-security.kubernetes.io/enforce-version"] == "v1.31"
    assert labels["kubeml.io/cost-center"] == "cc-42"
    assert ns["metadata"]["annotations"]["owner"] == "alice"


def test_no_cost_center_means_the_label_must_be_absent():
    ns = by_kind(desired_children(spec(), CONFIG), "Namespace")[0]

    assert ns["metadata"]["labels"]["kubeml.io/cost-center"] is None
    assert "kubeml.io/cost-center" not in creatable(ns)["metadata"]["labels"]


def test_quota_and_limit_defaults_are_capped_by_a_tiny_quota():
    children = desired_children(spec(quota={"cpu": "50m", "memory": "128Mi", "nvidia.com/gpu": 2, "pods": 3}), CONFIG)
    hard = by_kind(children, "ResourceQuota")[0]["spec"]["hard"]
    limits = by_kind(children, "LimitRange")[0]["spec"]["limits"][0]

    assert hard == {"requests.cpu": "50m", "requests.memory": "128Mi", "limits.memory": "128Mi",
                    "requests.nvidia.com/gpu": "2", "pods": "3"}
    assert limits["default"] == {"cpu": "50m", "memory": "128Mi"}
    assert limits["defaultRequest"] == {"cpu": "50m", "memory": "128Mi"}


def test_role_bindings_reference_only_the_tenant_cluster_roles():
    bindings = by_kind(desired_children(spec(), CONFIG), "RoleBinding")

    assert [b["roleRef"]["name"] for b in bindings] == ["kubeml-tenant-admin", "kubeml-tenant-editor",
                                                      "kubeml-tenant-viewer"]
    assert bindings[0]["subjects"][0]["name"] == "alice"
    assert bindings[1]["subjects"] == []
    assert bindings[2]["subjects"][0]["name"] == "bob"


def test_network_policies_deny_by_default_and_block_instance_metadata():
    policies = {p["metadata"]["name"]: p["spec"] for p in by_kind(desired_children(spec(), CONFIG), "NetworkPolicy")}

    assert policies["kubeml-default-deny"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    gateway = policies["kubeml-allow-ingress-gateway"]["ingress"][0]["from"][0]
    assert gateway["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "istio-system"}
    external = policies["kubeml-allow-egress"]["egress"][1]["to"][0]["ipBlock"]
    assert external["except"] == ["169.254.169.254/32"]


def _ns(name):
    return {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": name}}}


def _tcp(*ports):
    return [{"protocol": "TCP", "port": p} for p in ports]


def test_network_policies_allow_exactly_the_platform_flows():
    """The exact peers and ports, as manifests. The integration tests show the apiserver admits
    them (every Ready tenant has all six, and a converged one needs no patch), but the test
    cluster runs no NetworkPolicy enforcer (no CNI), so no test here shows a packet dropped."""
    policies = {p["metadata"]["name"]: p["spec"] for p in by_kind(desired_children(spec(), CONFIG), "NetworkPolicy")}

    assert sorted(policies) == ["kubeml-allow-egress", "kubeml-allow-ingress-gateway", "kubeml-allow-kuberay",
                                "kubeml-allow-monitoring", "kubeml-allow-same-tenant", "kubeml-default-deny"]
    assert policies["kubeml-allow-same-tenant"] == {
        "podSelector": {}, "policyTypes": ["Ingress", "Egress"],
        "ingress": [{"from": [{"podSelector": {}}]}], "egress": [{"to": [{"podSelector": {}}]}]}
    assert policies["kubeml-allow-ingress-gateway"] == {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [
        {"from": [_ns("istio-system")], "ports": _tcp(8080, 8081, 8012)}]}
    assert policies["kubeml-allow-monitoring"] == {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [
        {"from": [_ns("monitoring")], "ports": _tcp(8080)}]}
    assert policies["kubeml-allow-kuberay"] == {
        "podSelector": {"matchLabels": {"ray.io/node-type": "head"}}, "policyTypes": ["Ingress"],
        "ingress": [{"from": [_ns("kubeflow")], "ports": _tcp(8265)}]}
    assert policies["kubeml-allow-egress"] == {"podSelector": {}, "policyTypes": ["Egress"], "egress": [
        {"to": [{**_ns("kube-system"), "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
         "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
        {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["169.254.169.254/32"]}}], "ports": _tcp(443)},
        {"to": [_ns("mlflow")], "ports": _tcp(5000)},
        {"to": [_ns("kafka")], "ports": _tcp(9092)},
        {"to": [_ns("kubeflow")], "ports": _tcp(8887, 8888, 8080)},
    ]}


def test_no_network_policy_names_another_tenant_or_opens_all_ports_to_a_namespace():
    config = OperatorConfig(monitoring_namespace="prom", kafka=Peer("", ()), mlflow=Peer("ml", (80, 443)))
    platform = {"istio-system", "prom", "kube-system", "kubeflow", "ml"}
    for policy in by_kind(desired_children(spec(), config), "NetworkPolicy"):
        for rule in policy["spec"].get("ingress", []) + policy["spec"].get("egress", []):
            for peer in rule.get("from", []) + rule.get("to", []):
                if "namespaceSelector" in peer:
                    assert peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] in platform
                    assert rule["ports"], policy["metadata"]["name"]
                else:
                    assert peer == {"podSelector": {}} or "ipBlock" in peer
    egress = by_kind(desired_children(spec(), config), "NetworkPolicy")[-1]["spec"]["egress"]
    assert {"to": [_ns("ml")], "ports": _tcp(80, 443)} in egress
    assert not any(r["to"] == [_ns("kafka")] for r in egress)


def test_switching_the_kuberay_flow_off_keeps_the_policy_and_opens_nothing():
    config = OperatorConfig(kuberay=Peer.parse("none"))
    kuberay = next(p for p in by_kind(desired_children(spec(), config), "NetworkPolicy")
                   if p["metadata"]["name"] == "kubeml-allow-kuberay")

    assert kuberay["spec"]["ingress"] == []
    assert kuberay["spec"]["policyTypes"] == ["Ingress"]


@pytest.mark.parametrize("text,message", [("mlflow", "NAMESPACE:PORT"), ("mlflow:", "NAMESPACE:PORT"),
                                          ("kafka:90x", "must be numbers"), ("kafka:0", "1..65535"),
                                          ("Kafka:9092", "DNS label")])
def test_a_malformed_peer_is_refused_with_a_hint(text, message):
    with pytest.raises(ValueError, match=message):
        Peer.parse(text)


def test_peers_round_trip_through_their_flag_form():
    assert Peer.parse("kafka:9092,9093") == Peer("kafka", (9092, 9093))
    assert str(Peer("kafka", (9092, 9093))) == "kafka:9092,9093"
    assert str(Peer.parse("none")) == "none"
    with pytest.raises(ValueError, match="serving_ports"):
        OperatorConfig(serving_ports=())
    with pytest.raises(ValueError, match="monitoring_namespace"):
        OperatorConfig(monitoring_namespace="Not A Label")


def test_namespace_records_the_deletion_policy_and_the_tenant_role():
    arn = "arn:aws:iam::123456789012:role/team-a"
    retain = by_kind(desired_children(spec(iamRoleArn=arn), CONFIG), "Namespace")[0]["metadata"]
    delete = by_kind(desired_children(spec(deletionPolicy="Delete"), CONFIG), "Namespace")[0]["metadata"]

    assert retain["labels"]["kubeml.io/deletion-policy"] == "Retain"
    assert retain["labels"]["kubeml.io/orphaned"] is None
    assert retain["labels"]["app.kubernetes.io/managed-by"] == "kubeml-operator"
    assert retain["annotations"]["kubeml.io/iam-role-arn"] == arn
    assert delete["labels"]["kubeml.io/deletion-policy"] == "Delete"
    assert delete["annotations"]["kubeml.io/iam-role-arn"] is None


def test_namespaced_children_name_what_desired_children_builds_inside_the_namespace():
    built = [(c["apiVersion"], c["kind"], c["metadata"]["name"]) for c in desired_children(spec(), CONFIG)
             if c["kind"] not in ("Namespace", "Profile")]

    assert namespaced_children("team-a", CONFIG) == built


def test_service_account_is_annotated_for_irsa_only_when_an_arn_is_given():
    arn = "arn:aws:iam::123456789012:role/team-a"
    with_arn = by_kind(desired_children(spec(iamRoleArn=arn), CONFIG), "ServiceAccount")[0]
    without = by_kind(desired_children(spec(), CONFIG), "ServiceAccount")[0]

    assert with_arn["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] == arn
    assert without["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] is None


def test_profiles_can_be_switched_off():
    children = desired_children(spec(), OperatorConfig(kubeflow_profiles=False))

    assert not by_kind(children, "Profile")


def test_config_rejects_a_bad_resync_or_pss_version():
    with pytest.raises(ValueError, match="resync_s"):
        OperatorConfig(resync_s=0)
    with pytest.raises(ValueError, match="pod_security_version"):
        OperatorConfig(pod_security_version="1.30")


# --- drift detection -------------------------------------------------------------------------

def as_stored(desired: dict) -> dict:
    """What the apiserver hands back: markers dropped, extra metadata, omitempty, canonical quantities."""
    live = copy.deepcopy(creatable(desired))
    live["metadata"].update({"uid": "x", "resourceVersion": "7", "managedFields": []})
    live["metadata"]["labels"]["kubernetes.io/metadata.name"] = "team-a"
    if live.get("subjects") == []:
        del live["subjects"]
    if live["kind"] == "ResourceQuota":
        live["spec"]["hard"]["requests.memory"] = "32Gi"
    return live


def test_a_converged_object_needs_no_write():
    for child in desired_children(spec(quota={"memory": "32768Mi"}), CONFIG):
        assert patch_for(child, as_stored(child)) is None, child["kind"]


def test_an_extra_rule_in_the_deny_policy_is_drift_and_is_removed():
    deny = by_kind(desired_children(spec(), CONFIG), "NetworkPolicy")[0]
    live = as_stored(deny)
    live["spec"]["ingress"] = [{"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}]

    assert patch_for(deny, live) == {"spec": {"ingress": None}}


def test_a_subject_added_by_hand_is_removed():
    viewer = by_kind(desired_children(spec(), CONFIG), "RoleBinding")[2]
    live = as_stored(viewer)
    live["subjects"].append({"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "mallory"})

    assert patch_for(viewer, live) == {"subjects": viewer["subjects"]}


def test_a_changed_role_ref_cannot_be_patched():
    binding = by_kind(desired_children(spec(), CONFIG), "RoleBinding")[0]
    live = as_stored(binding)
    live["roleRef"]["name"] = "cluster-admin"

    with pytest.raises(ValueError, match="immutable"):
        patch_for(binding, live)


def test_dropping_the_arn_removes_only_the_operator_annotations():
    sa_with = by_kind(desired_children(spec(iamRoleArn="arn:aws:iam::123456789012:role/a"), CONFIG),
                      "ServiceAccount")[0]
    live = as_stored(sa_with)
    live["metadata"]["annotations"]["team.example.com/note"] = "keep me"
    sa_without = by_kind(desired_children(spec(), CONFIG), "ServiceAccount")[0]

    assert patch_for(sa_without, live) == {"metadata": {"annotations": {
        "eks.amazonaws.com/role-arn": None, "eks.amazonaws.com/sts-regional-endpoints": None}}}


def test_a_removed_owner_reference_is_restored():
    quota = by_kind(desired_children(spec(), CONFIG), "ResourceQuota")[0]
    live = as_stored(quota)
    live["metadata"]["ownerReferences"] = []

    assert patch_for(quota, live) == {"metadata": {"ownerReferences": quota["metadata"]["ownerReferences"]}}


def test_merge_patch_nulls_removed_keys_and_replaces_lists():
    assert merge_patch({"a": 1, "b": {"c": 1, "d": 2}, "l": [1]}, {"a": 1, "b": {"c": 2}, "l": [2]}) == {
        "b": {"c": 2, "d": None}, "l": [2]}
