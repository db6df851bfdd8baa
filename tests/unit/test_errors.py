"""The one error tree: every class pickles (errors cross Ray and KFP processes) and says
whether a retry can help."""

from __future__ import annotations

import inspect
import pickle

import pytest

import kubeml.errors as errors

#: Constructor arguments for the classes that take more than a message.
ARGS = {
    "DataValidationError": (["rows < 100", "label missing"],),
    "PortInUse": (8080, "router"),
    "ClusterAlreadyRunning": ("kubeml", "https://127.0.0.1:6443"),
    "ComponentFailed": ("etcd", "exited", "last line", "/tmp/etcd.log"),
    "JobFailed": ("RayJob ns/x failed", "OOMKilled"),
    "JobApiError": ("forbidden", 403),
    "ServingRequestError": ("bad request", 400),
}
CLASSES = [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, errors.KubemlError)]


def test_every_error_class_is_exported():
    assert {c.__name__ for c in CLASSES} <= set(errors.__all__)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_error_pickles_with_its_message_and_retry_meaning(cls):
    exc = cls(*ARGS.get(cls.__name__, ("something went wrong",)))
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is cls
    assert str(back) == str(exc)
    assert errors.is_retryable(back) == errors.is_retryable(exc)


@pytest.mark.parametrize(("exc", "retryable"), [
    (errors.ConfigError("bad key"), False),
    (errors.DataValidationError(["x"]), False),
    (errors.ArtifactError("S3 throttled"), True),
    (errors.ArtifactNotFound("no such key"), False),
    (errors.TrainingFailed("worker died"), True),
    (errors.CheckpointCorrupt("bad manifest"), False),
    (errors.JobTimedOut("still running"), True),
    (errors.JobCancelled("deleted"), False),
    (errors.JobApiError("forbidden", 403), False),
    (errors.JobApiError("apiserver down", 503), True),
    (errors.JobApiError("connection lost", None), True),
    (errors.ServingRequestError("bad input", 400), False),
    (errors.ServingRequestError("overloaded", 503), True),
    (errors.StageFailed("earlier attempt"), False),
    (ValueError("a bug"), False),
])
def test_retryable_follows_the_tree(exc, retryable):
    assert errors.is_retryable(exc) is retryable
