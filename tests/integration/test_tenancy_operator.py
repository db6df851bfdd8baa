"""The Tenant operator against the real control plane: idempotence, drift repair, deletion,
rejected specs, fuzzing, and crash recovery.

The operator runs in-process with the chart's ServiceAccount token (so the chart's RBAC is
exercised), except in the crash test, where it is a subprocess killed with SIGKILL.
"""

from __future__ import annotations

import json
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from kubeml._proc import free_port
from kubeml.testing.cluster.fixtures import wait_until
from kubeml.operators import KubeApi
from tests.integration.tenancy_fixtures import (
    RESYNC_S,
    TENANT_API,
    children_of,
    create_tenant,
    delete_tenant,
    get_tenant,
    operator_client,  # noqa: F401 (fixture)
    operator_running,
    platform,  # noqa: F401 (fixture)
    ready_condition,
    resource_versions,
    tenant_body,
    wait_ready,
)

pytestmark = pytest.mark.integration

#: Children of a Ready tenant: Namespace, quota, limits, 3 RoleBindings, 6 NetworkPolicies,
#: the workload ServiceAccount and the Kubeflow Profile.
CHILDREN = 14
#: Fuzzed Tenant specs (KUBEML_TENANCY_FUZZ=50 for a quick local run).
FUZZ_COUNT = int(os.environ.get("KUBEML_TENANCY_FUZZ", "500"))
#: Operator processes killed in the crash-recovery test, and the seconds the next one may take
#: to converge.
KILLS = int(os.environ.get("KUBEML_TENANCY_KILLS", "20"))
CONVERGE_S = 30.0


@pytest.fixture(scope="module")
def admin_api(admin: Any) -> KubeApi:
    return KubeApi(admin)


@pytest.fixture
def operator(operator_client: Any) -> Iterator[Any]:  # noqa: F811
    with operator_running(operator_client) as running:
        yield running


def _settled(admin: Any, name: str, quiet_s: float = 2.0, timeout_s: float = 60.0) -> dict:
    """The Tenant once its resourceVersion has not moved for ``quiet_s``."""
    deadline = time.monotonic() + timeout_s
    last = get_tenant(admin, name)
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = get_tenant(admin, name)
        if now["metadata"]["resourceVersion"] == last["metadata"]["resourceVersion"]:
            return now
        last = now
    raise AssertionError(f"Tenant {name} kept changing for {timeout_s:.0f} s")


def test_a_hundred_forced_reconciles_of_a_converged_tenant_write_nothing(admin, admin_api, operator):
    create_tenant(admin, tenant_body("idem", ["alice"], [{"name": "bob", "role": "editor"}], deletionPolicy="Delete",
                                     quota={"cpu": "1500m", "memory": "1536Mi"},
                                     iamRoleArn="arn:aws:iam::123456789012:role/idem"))
    try:
        tenant = wait_ready(admin, "idem")
        refs = children_of(admin_api, "idem", tenant["metadata"]["uid"])
        assert len(refs) == CHILDREN
        # Ready is written before kopf records the handled state on the Tenant (its own
        # annotation patch, not the operator's API): start counting once that has landed.
        tenant = _settled(admin, "idem")
        before = resource_versions(admin_api, refs)
        tenant_version = tenant["metadata"]["resourceVersion"]
        writes_before = operator.api.counts().writes
        reads_before = operator.api.counts().reads

        for _ in range(100):
            outcome = operator.reconcile_now(get_tenant(admin, "idem"))
            assert (outcome.ready, outcome.created, outcome.patched) == (True, 0, 0)
        time.sleep(RESYNC_S * 1.5)  # and at least one timer-driven resync on top

        counts = operator.api.counts()
        assert counts.writes == writes_before
        assert resource_versions(admin_api, refs) == before
        assert get_tenant(admin, "idem")["metadata"]["resourceVersion"] == tenant_version
        # One GET per child, nothing else: the price of a resync.
        assert (counts.reads - reads_before) >= 100 * CHILDREN
    finally:
        delete_tenant(admin, "idem")


@pytest.mark.parametrize("kind,name", [("NetworkPolicy", "kubeml-default-deny"),
                                       ("RoleBinding", "kubeml-tenant-admin")])
def test_a_deleted_managed_object_is_repaired_within_one_resync(admin, operator, kind, name):
    create_tenant(admin, tenant_body("drift", ["alice"], deletionPolicy="Delete"))
    try:
        wait_ready(admin, "drift")
        if kind == "NetworkPolicy":
            k8s.NetworkingV1Api(admin).delete_namespaced_network_policy(name, "drift")
            read = lambda: k8s.NetworkingV1Api(admin).read_namespaced_network_policy(name, "drift")  # noqa: E731
        else:
            k8s.RbacAuthorizationV1Api(admin).delete_namespaced_role_binding(name, "drift")
            read = lambda: k8s.RbacAuthorizationV1Api(admin).read_namespaced_role_binding(name, "drift")  # noqa: E731
        deleted_at = time.monotonic()

        def back() -> bool:
            try:
                return read() is not None
            except ApiException as exc:
                if exc.status == 404:
                    return False
                raise

        # One resync, plus slack for a loaded machine (kopf's timer and the watch both lag).
        wait_until(back, timeout_s=RESYNC_S + 3, interval_s=0.1, what=f"{kind} {name} to be recreated")
        assert time.monotonic() - deleted_at <= RESYNC_S + 3
    finally:
        delete_tenant(admin, "drift")


def test_deleting_a_tenant_removes_everything_it_created(admin, admin_api, operator):
    create_tenant(admin, tenant_body("gone", ["alice"], [{"name": "vic", "role": "viewer"}], deletionPolicy="Delete"))
    uid = wait_ready(admin, "gone")["metadata"]["uid"]
    assert len(children_of(admin_api, "gone", uid)) == CHILDREN

    delete_tenant(admin, "gone")

    assert children_of(admin_api, "gone") == []
    with pytest.raises(ApiException) as excinfo:
        k8s.CoreV1Api(admin).read_namespace("gone")
    assert excinfo.value.status == 404


# --- deletion policy ------------------------------------------------------------------------------

def _denied(call: Any) -> str:
    """The apiserver's message for a request that must be refused with 403."""
    with pytest.raises(ApiException) as excinfo:
        call()
    assert excinfo.value.status == 403, excinfo.value.body
    return json.loads(excinfo.value.body)["message"]


def _release_retained(core: Any, name: str) -> None:
    """What an administrator does to remove a retained namespace: relabel it, then delete it."""
    with contextlib.suppress(ApiException):
        core.patch_namespace(name, {"metadata": {"labels": {"kubeml.io/deletion-policy": "Delete"}}})
    with contextlib.suppress(ApiException):
        core.delete_namespace(name)


@pytest.mark.parametrize("propagation", ["Background", "Foreground"])
def test_deleting_a_tenant_retains_its_namespace_and_data_by_default(admin, admin_api, operator, propagation):
    core = k8s.CoreV1Api(admin)
    name = f"keep-{propagation.lower()}"
    create_tenant(admin, tenant_body(name, ["alice"], [{"name": "bob", "role": "editor"}]))
    try:
        uid = wait_ready(admin, name)["metadata"]["uid"]
        core.create_namespaced_config_map(name, {"metadata": {"name": "results"}, "data": {"accuracy": "0.97"}})
        core.create_namespaced_secret(name, {"metadata": {"name": "creds"}, "stringData": {"token": "t"}})

        # Foreground: the garbage collector deletes the Tenant's dependents, the namespace
        # among them, before the Tenant itself; the retention policy must refuse it.
        k8s.CustomObjectsApi(admin).delete_cluster_custom_object(*TENANT_API, name, propagation_policy=propagation)
        wait_until(lambda: get_tenant(admin, name) is None, timeout_s=60, what=f"tenant {name} to be deleted")
        rbac = k8s.RbacAuthorizationV1Api(admin)
        wait_until(lambda: not rbac.list_namespaced_role_binding(name).items, timeout_s=30,
                   what="the garbage collector to remove the tenant's RoleBindings")

        ns = core.read_namespace(name)
        assert ns.metadata.deletion_timestamp is None and ns.status.phase == "Active"
        assert ns.metadata.owner_references is None
        assert ns.metadata.labels["kubeml.io/orphaned"] == "true"
        assert ns.metadata.labels["kubeml.io/deletion-policy"] == "Retain"
        assert ns.metadata.labels["kubeml.io/tenant"] == name  # the tenant admission policies still hold
        assert ns.metadata.annotations["kubeml.io/orphaned-from"] == f"Tenant {name} (uid {uid})"
        assert ns.metadata.annotations["kubeml.io/orphaned-at"].endswith("Z")
        assert core.read_namespaced_config_map("results", name).data == {"accuracy": "0.97"}
        assert core.read_namespaced_secret("creds", name).data
        # Still confined: quota, limits and network policy stay, released from the Tenant.
        policies = k8s.NetworkingV1Api(admin).list_namespaced_network_policy(name).items
        assert len(policies) == 6 and all(p.metadata.owner_references is None for p in policies)
        assert core.read_namespaced_resource_quota("kubeml-quota", name).metadata.owner_references is None
        assert children_of(admin_api, name) == []

        body = _denied(lambda: core.delete_namespace(name))
        assert "ValidatingAdmissionPolicy 'kubeml-namespace-retention'" in body
        assert "label it kubeml.io/deletion-policy=Delete first" in body

        # A new Tenant of the same name does not silently take the old data over.
        create_tenant(admin, tenant_body(name, ["mallory"], deletionPolicy="Delete"))
        condition = ready_condition(wait_ready(admin, name, status="False"))
        assert condition["reason"] == "NamespaceConflict"
        assert f"retained when Tenant {name} (uid {uid}) was deleted" in condition["message"]
    finally:
        delete_tenant(admin, name)
        _release_retained(core, name)


def test_the_operator_may_delete_only_namespaces_it_manages(admin, operator_client, operator):  # noqa: F811
    as_operator = k8s.CoreV1Api(operator_client)
    create_tenant(admin, tenant_body("owned-del", ["alice"], deletionPolicy="Delete"))
    create_tenant(admin, tenant_body("owned-keep", ["alice"]))
    try:
        wait_ready(admin, "owned-del")
        wait_ready(admin, "owned-keep")
        # Dry runs: admission runs in full, nothing is deleted if a policy failed to hold.
        # kube-system: the apiserver's NamespaceLifecycle plugin refuses first, for anyone.
        assert "this namespace may not be deleted" in _denied(
            lambda: as_operator.delete_namespace("kube-system", dry_run="All"))
        # Any other namespace the operator does not manage: the policy refuses it.
        body = _denied(lambda: as_operator.delete_namespace("kubeml-system", dry_run="All"))
        assert "ValidatingAdmissionPolicy 'kubeml-operator-namespaces'" in body
        assert "may delete only namespaces it manages" in body and "namespace kubeml-system is not one" in body
        assert "may update only namespaces it manages" in _denied(lambda: as_operator.patch_namespace(
            "kube-system", {"metadata": {"labels": {"app.kubernetes.io/managed-by": "kubeml-operator"}}}, dry_run="All"))
        assert "may create only namespaces it manages" in _denied(lambda: as_operator.create_namespace(
            {"metadata": {"name": "not-a-tenant"}}, dry_run="All"))
        assert "is retained (kubeml.io/deletion-policy=Retain)" in _denied(
            lambda: as_operator.delete_namespace("owned-keep", dry_run="All"))

        as_operator.delete_namespace("owned-del", dry_run="All")  # admitted: no exception
        assert k8s.CoreV1Api(admin).read_namespace("owned-del").metadata.deletion_timestamp is None
        assert k8s.CoreV1Api(admin).read_namespace("kube-system").metadata.deletion_timestamp is None
    finally:
        delete_tenant(admin, "owned-del")
        delete_tenant(admin, "owned-keep")
        _release_retained(k8s.CoreV1Api(admin), "owned-keep")


def test_a_foreign_namespace_is_refused_and_left_untouched(admin, admin_api, operator):
    core = k8s.CoreV1Api(admin)
    core.create_namespace({"metadata": {"name": "someone-else", "labels": {"owner": "platform"}}})
    try:
        create_tenant(admin, tenant_body("someone-else", ["mallory"]))
        tenant = wait_ready(admin, "someone-else", status="False")
        condition = ready_condition(tenant)

        assert condition["reason"] == "NamespaceConflict"
        assert "not managed by this Tenant" in condition["message"]
        assert children_of(admin_api, "someone-else") == []
        ns = core.read_namespace("someone-else")
        assert ns.metadata.owner_references is None
        assert "kubeml.io/tenant" not in ns.metadata.labels

        delete_tenant(admin, "someone-else")
        ns = core.read_namespace("someone-else")
        assert ns.metadata.deletion_timestamp is None
        assert "kubeml.io/orphaned" not in ns.metadata.labels  # not ours, so not ours to orphan either
    finally:
        core.delete_namespace("someone-else")


@pytest.mark.parametrize("name,spec,message", [
    ("kube-system", {"owners": ["alice"]}, "reserved"),
    ("default", {"owners": ["alice"]}, "reserved"),
    ("kubeflow", {"owners": ["alice"]}, "reserved"),
    ("team.dots", {"owners": ["alice"]}, "DNS label"),
    ("wild", {"owners": ["*"]}, "wildcards are not allowed"),
    ("masters", {"owners": ["system:masters"]}, "system: identity"),
    ("neg", {"owners": ["alice"], "quota": {"cpu": "-2"}}, "quota.cpu"),
    ("huge", {"owners": ["alice"], "quota": {"memory": "1Ei"}}, "quota.memory"),
    ("gpus", {"owners": ["alice"], "quota": {"nvidia.com/gpu": 100000}}, "nvidia.com/gpu"),
    ("arn", {"owners": ["alice"], "iamRoleArn": "arn:aws:iam::12:role/x"}, "iamRoleArn"),
    ("dup", {"owners": ["alice"], "members": [{"name": "b", "role": "viewer"}, {"name": "b", "role": "admin"}]},
     "Duplicate value"),
    ("policy", {"owners": ["alice"], "deletionPolicy": "delete"}, "spec.deletionPolicy: Unsupported value"),
])
def test_the_schema_rejects_bad_specs_before_the_operator_sees_them(admin, name, spec, message):
    body = {"apiVersion": "kubeml.io/v1alpha1", "kind": "Tenant", "metadata": {"name": name}, "spec": spec}
    with pytest.raises(ApiException) as excinfo:
        k8s.CustomObjectsApi(admin).create_cluster_custom_object(*TENANT_API, body)

    assert excinfo.value.status == 422
    assert message in excinfo.value.body


# --- fuzzing ------------------------------------------------------------------------------------

def _fuzz_spec(rng: random.Random, index: int, foreign: list[str]) -> tuple[str, dict]:
    """A Tenant that is valid, subtly invalid, or hostile, in proportions that exercise both paths.

    A third of the specs are hostile (each field wrong half the time, so nearly all are refused
    by the schema or the operator); the rest get each field wrong with a small probability, so
    most are valid tenants the operator must build in full, and some carry one subtle error.
    """
    p_bad = 0.5 if rng.random() < 1 / 3 else 0.03

    def pick(good: list[Any], bad: list[Any]) -> Any:
        return rng.choice(bad) if rng.random() < p_bad else rng.choice(good)

    good_users = ["alice", "bob", "carol", "x@example.com", "arn:aws:iam::123456789012:role/r"]
    bad_users = ["*", "system:masters", "system:serviceaccount:kube-system:x", "", "a" * 300, "bad user", "Δ"]
    good_quantities = ["1", "250m", "16", "4096", "64Ti", "1.5Gi"]
    bad_quantities = ["0", "4097", "-1", "1e3", "lots", "", "65Ti", "0.1", -3, 2]
    name = pick([f"fz-{index}"], [rng.choice(foreign), "kube-fz", "default", "FZ-UPPER", f"fz-{index}.x", "-fz"])
    spec: dict[str, Any] = {}
    if rng.random() < 0.97:
        spec["owners"] = [pick(good_users, bad_users) for _ in range(pick([1, 1, 2], [0, 2]))]
    if rng.random() < 0.5:
        spec["members"] = [{"name": pick(good_users, bad_users), "role": pick(["admin", "editor", "viewer"], ["root", ""])}
                           for _ in range(rng.randint(0, 3))]
    if rng.random() < 0.7:
        quota: dict[str, Any] = {}
        for key in ("cpu", "memory"):
            if rng.random() < 0.6:
                quota[key] = pick(good_quantities, bad_quantities)
        for key, top in (("nvidia.com/gpu", 512), ("pods", 10000)):
            if rng.random() < 0.5:
                quota[key] = pick([0, 1, top, "3"], [top + 1, -1, 2.5])
        if rng.random() < 0.1:
            quota["ephemeral-storage"] = "1Ti"
        spec["quota"] = quota
    if rng.random() < 0.4:
        spec["iamRoleArn"] = pick(["arn:aws:iam::123456789012:role/ok", "arn:aws-cn:iam::123456789012:role/a/b/c"],
                                  ["arn:aws:iam::1:role/x", "arn:aws:s3:::b"])
    if rng.random() < 0.3:
        spec["s3Prefix"] = pick(["s3://bucket/a/"], ["s3://B/", "http://x", "s3://bucket"])
    if rng.random() < 0.3:
        spec["costCenter"] = pick(["cc-1"], ["cc 1", "-cc", "x" * 64])
    if rng.random() < 0.2:
        spec["nodeGroups"] = rng.sample(["cpu", "gpu-p4d"], rng.randint(0, 2)) + pick([[]], [["GPU"], ["a_b"]])
    if rng.random() < 0.05:
        spec["unknownField"] = {"pruned": True}
    # Delete, so the test leaves no namespace behind.
    spec["deletionPolicy"] = "Delete"
    return name, {"apiVersion": "kubeml.io/v1alpha1", "kind": "Tenant", "metadata": {"name": name}, "spec": spec}


def test_fuzzed_tenants_never_crash_the_operator_nor_leave_partial_children(admin, admin_api, operator):
    rng = random.Random(20260601)
    core = k8s.CoreV1Api(admin)
    foreign = [f"fz-foreign-{i}" for i in range(3)]
    for name in foreign:
        core.create_namespace({"metadata": {"name": name}})
    accepted: dict[str, dict] = {}
    refused = 0
    try:
        for index in range(FUZZ_COUNT):
            name, body = _fuzz_spec(rng, index, foreign)
            if name in accepted:
                continue
            try:
                accepted[name] = create_tenant(admin, body)
            except ApiException as exc:
                assert exc.status in (400, 422), exc.body  # the schema said no; never a 500
                refused += 1

        def settled() -> bool:
            return all(ready_condition(get_tenant(admin, name)).get("status") in ("True", "False")
                       for name in accepted)

        wait_until(settled, timeout_s=120 + FUZZ_COUNT * 0.5, interval_s=1, what="every fuzzed tenant to settle")
        problems = []
        for name, created in accepted.items():
            condition = ready_condition(get_tenant(admin, name))
            owned = children_of(admin_api, name, created["metadata"]["uid"])
            if condition["status"] == "True" and len(owned) != CHILDREN:
                problems.append(f"{name}: Ready with {len(owned)} children")
            if condition["status"] == "False":
                if owned:
                    problems.append(f"{name}: rejected ({condition['reason']}) but left {owned}")
                if name not in foreign:
                    # The schema and the operator must agree: whatever the apiserver accepted,
                    # the operator builds, unless the namespace is someone else's.
                    problems.append(f"{name}: accepted by the schema but rejected: {condition['message']}")
        assert not problems, "\n".join(problems)
        assert accepted and refused, (len(accepted), refused)
        ready = sum(ready_condition(get_tenant(admin, n))["status"] == "True" for n in accepted)
        print(f"\n{FUZZ_COUNT} fuzzed Tenant specs: {refused} refused by the schema, {len(accepted)} accepted "
              f"({ready} Ready, {len(accepted) - ready} rejected by the operator), none partial")
        # The operator is still alive and working.
        create_tenant(admin, tenant_body("fz-canary", ["alice"], deletionPolicy="Delete"))
        wait_ready(admin, "fz-canary")
        accepted["fz-canary"] = {}
    finally:
        for name in accepted:
            delete_tenant(admin, name, wait=False)
        for name in accepted:
            delete_tenant(admin, name, timeout_s=180)
        for name in foreign:
            core.delete_namespace(name)
    for name in accepted:
        if name not in foreign:
            assert children_of(admin_api, name) == [], name


# --- crash recovery -------------------------------------------------------------------------------

@contextlib.contextmanager
def _operator_process(kubeconfig: str, log: Any) -> Iterator[subprocess.Popen[bytes]]:
    argv = [sys.executable, "-m", "kubeml.operators", f"--kubeconfig={kubeconfig}", f"--resync-seconds={RESYNC_S}",
            f"--health-port={free_port()}", "--metrics-port=0"]
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(10)


def test_operator_killed_mid_reconcile_converges_after_restart_without_orphans(cluster, admin, admin_api, platform,  # noqa: F811
                                                                                 tmp_path):
    """KILLS operator processes SIGKILLed at random points (start-up, mid-way through a
    tenant's writes, cleanup of a deleted one, a tenant created between two kills): the next
    operator converges within CONVERGE_S, with every child in place and no orphan."""
    rng = random.Random(7)
    names = [f"crash-{i}" for i in range(6)]
    late = [f"crash-late-{i}" for i in range(2)]  # created while operators keep dying
    log = (tmp_path / "operator.log").open("ab")
    for name in names:
        create_tenant(admin, tenant_body(name, ["alice"], [{"name": "bob", "role": "viewer"}], deletionPolicy="Delete"))
    doomed = names[:2]
    kept = names[2:] + late
    try:
        for round_ in range(KILLS):
            with _operator_process(str(cluster.admin_kubeconfig), log) as proc:
                time.sleep(rng.uniform(0.3, 2.5))
                if round_ == 1:
                    for name in doomed:
                        delete_tenant(admin, name, wait=False)
                    time.sleep(rng.uniform(0.05, 0.5))
                if round_ == KILLS // 2:
                    for name in late:
                        create_tenant(admin, tenant_body(name, ["alice"], deletionPolicy="Delete"))
                    time.sleep(rng.uniform(0.05, 0.5))
                assert proc.poll() is None, "the operator exited on its own"
                proc.send_signal(signal.SIGKILL)
        with _operator_process(str(cluster.admin_kubeconfig), log):
            started = time.monotonic()
            for name in kept:
                wait_ready(admin, name, timeout_s=CONVERGE_S)
            for name in doomed:
                wait_until(lambda n=name: get_tenant(admin, n) is None, timeout_s=CONVERGE_S, what=f"{name} to be deleted")
            converged_s = time.monotonic() - started
            for name in kept:
                uid = get_tenant(admin, name)["metadata"]["uid"]
                assert len(children_of(admin_api, name, uid)) == CHILDREN, name
            for name in doomed:
                assert children_of(admin_api, name) == [], name
            assert converged_s <= CONVERGE_S, converged_s
            print(f"\n{KILLS} operator kills: converged {converged_s:.1f} s after the last restart")
            for name in kept:
                delete_tenant(admin, name, wait=False)
            for name in kept:
                delete_tenant(admin, name)
        leftovers = k8s.CoreV1Api(admin).list_namespace(label_selector="kubeml.io/tenant").items
        assert [ns.metadata.name for ns in leftovers if ns.metadata.name.startswith("crash-")] == []
    finally:
        log.close()
        for name in names + late:
            with contextlib.suppress(ApiException):
                k8s.CustomObjectsApi(admin).patch_cluster_custom_object(*TENANT_API, name, {"metadata": {"finalizers": None}})
            delete_tenant(admin, name, wait=False)
