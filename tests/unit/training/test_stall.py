"""A RayJob whose Ray cluster never comes up is reported stalled, with its cause."""

from __future__ import annotations

import pytest
from kubernetes.client import (
    V1ContainerState,
    V1ContainerStateWaiting,
    V1ContainerStatus,
    V1ObjectMeta,
    V1Pod,
    V1PodCondition,
    V1PodStatus,
)

from kubeml.errors import JobStalled, is_retryable
from kubeml.training.launchers import _jobs
from kubeml.training.launchers._jobs import _Ref, _StallWatch

REF = _Ref.of({"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "kubeml-r1", "namespace": "team-a"}},
              None)


def _pod(name: str, *, head: bool = False, waiting: tuple[str, str] | None = None,
         unschedulable: str | None = None, ready: bool = False) -> V1Pod:
    statuses = [V1ContainerStatus(
        name="ray-head" if head else "ray-worker", image="img:1", image_id="", ready=ready, restart_count=0,
        state=V1ContainerState(waiting=V1ContainerStateWaiting(reason=waiting[0], message=waiting[1]) if waiting else None),
    )] if not unschedulable else []
    conditions = [V1PodCondition(type="PodScheduled", status="False", reason="Unschedulable",
                                 message=unschedulable)] if unschedulable else []
    return V1Pod(metadata=V1ObjectMeta(name=name, labels={"ray.io/node-type": "head" if head else "worker"}),
                 status=V1PodStatus(phase="Pending" if unschedulable else "Running", conditions=conditions,
                                    container_statuses=statuses))


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    clock = _Clock()
    monkeypatch.setattr(_jobs.time, "monotonic", clock)
    return clock


def _watch(pods: list[V1Pod], **kwargs: float) -> _StallWatch:
    watch = _StallWatch(REF, None, stall_s=kwargs.get("stall_s", 600), image_grace_s=kwargs.get("image_grace_s", 60))
    watch._pods = lambda st: pods  # type: ignore[method-assign]
    return watch


STARTING = {"status": {"jobDeploymentStatus": "Initializing", "rayClusterName": "kubeml-r1-raycluster"}}


def test_an_image_error_stalls_the_job_after_its_grace(clock: _Clock) -> None:
    watch = _watch([_pod("kubeml-r1-head", head=True,
                         waiting=("ErrImageNeverPull", 'image "ghcr.io/kubeml/kubeml-python:0.1.0" is not present'))])
    watch.check(STARTING)
    clock.now += 59
    watch.check(STARTING)  # within the grace: a registry blip may recover
    clock.now += 2
    with pytest.raises(JobStalled) as info:
        watch.check(STARTING)
    message = str(info.value)
    assert "RayJob team-a/kubeml-r1 is stalled: pod kubeml-r1-head cannot start container ray-head" in message
    assert "ErrImageNeverPull" in message and "training.launcher.image" in message
    assert not is_retryable(info.value)


def test_an_unschedulable_pod_is_quoted_once_the_stall_time_is_up(clock: _Clock) -> None:
    why = "0/5 nodes are available: 5 Insufficient nvidia.com/gpu."
    watch = _watch([_pod("kubeml-r1-head", head=True, ready=True), _pod("kubeml-r1-worker-0", unschedulable=why)])
    watch.check(STARTING)
    clock.now += 599
    watch.check(STARTING)
    clock.now += 2
    with pytest.raises(JobStalled, match=r"not running after 600 s \(Initializing\): pod kubeml-r1-worker-0 "
                                         r"cannot be scheduled \(Unschedulable\): 0/5 nodes are available"):
        watch.check(STARTING)


def test_a_head_that_never_turns_ready_is_named(clock: _Clock) -> None:
    watch = _watch([_pod("kubeml-r1-head", head=True, waiting=("CrashLoopBackOff", "back-off 5m0s"))])
    watch.check(STARTING)
    clock.now += 601
    with pytest.raises(JobStalled, match="head pod kubeml-r1-head: CrashLoopBackOff: back-off 5m0s"):
        watch.check(STARTING)


def test_without_pods_the_cause_comes_from_the_cluster_conditions(clock: _Clock) -> None:
    obj = {"status": {"jobDeploymentStatus": "Initializing", "rayClusterStatus": {"conditions": [
        {"type": "HeadPodReady", "status": "False", "reason": "HeadPodNotFound", "message": ""},
        {"type": "RayClusterProvisioned", "status": "True"}]}}}
    watch = _watch([])
    watch.check(obj)
    clock.now += 601
    with pytest.raises(JobStalled, match=r"HeadPodReady=False \(HeadPodNotFound\)"):
        watch.check(obj)


def test_no_status_at_all_suggests_the_operator_is_missing(clock: _Clock) -> None:
    watch = _watch([])
    watch.check({"status": {}})
    clock.now += 601
    with pytest.raises(JobStalled, match="no cause reported \\(is the KubeRay operator running\\?\\)"):
        watch.check({"status": {}})


def test_a_running_cluster_resets_the_clock(clock: _Clock) -> None:
    watch = _watch([_pod("kubeml-r1-worker-0", unschedulable="0/1 nodes are available")])
    watch.check(STARTING)
    clock.now += 500
    watch.check({"status": {"jobDeploymentStatus": "Running"}})
    clock.now += 500
    watch.check(STARTING)  # a new start: its clock begins now
    clock.now += 500
    watch.check(STARTING)  # 500 s into this start, not 1500 in all: no stall yet
    clock.now += 101
    with pytest.raises(JobStalled):
        watch.check(STARTING)
