"""Image names come from kubeml.images, and every place that runs an image uses them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from kubeml.errors import ConfigError
from kubeml.images import IMAGES, REGISTRY_ENV, TAG_ENV, default_tag, image_ref

ROOT = Path(__file__).resolve().parents[2]


def test_names_and_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    assert image_ref("operator") == f"ghcr.io/kubeml/kubeml:{default_tag()}"
    assert image_ref("server") == f"ghcr.io/kubeml/kubeml-server:{default_tag()}"
    assert image_ref("runtime") == f"ghcr.io/kubeml/kubeml-python:{default_tag()}"
    monkeypatch.setenv(REGISTRY_ENV, "123456789012.dkr.ecr.us-east-1.amazonaws.com/ml/")
    monkeypatch.setenv(TAG_ENV, "2026.12.1")
    assert image_ref("server") == "123456789012.dkr.ecr.us-east-1.amazonaws.com/ml/kubeml-server:2026.12.1"
    assert image_ref("server", registry="localhost:5000/k", tag="t1") == "localhost:5000/k/kubeml-server:t1"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"kind": "trainer"}, "unknown image 'trainer'; kubeml has runtime, server, operator"),
    ({"kind": "server", "registry": "Bad Registry"}, "image registry 'Bad Registry' is not a valid"),
    ({"kind": "server", "tag": "-dash"}, "image tag '-dash' is not valid"),
    ({"kind": "server", "tag": "a" * 129}, "is not valid"),
])
def test_bad_names_are_refused(kwargs: dict, message: str) -> None:
    kind = kwargs.pop("kind")
    with pytest.raises(ConfigError, match=re.escape(message)):
        image_ref(kind, **kwargs)


def test_every_image_has_its_containerfile_with_labels_and_a_non_root_user() -> None:
    for image in IMAGES.values():
        text = (ROOT / image.containerfile).read_text()
        assert "ARG BASE=python:3.11-slim-bookworm" in text
        for label in ("source", "revision", "version"):
            assert f"org.opencontainers.image.{label}=" in text
        users = re.findall(r"^USER (\S+)", text, re.M)
        assert users and users[-1].split(":")[0] not in ("0", "root")
        assert "ENTRYPOINT" in text


def test_chart_overlays_and_manifests_name_the_operator_and_runtime_images() -> None:
    repository, _, tag = image_ref("operator").rpartition(":")
    values = yaml.safe_load((ROOT / "charts/kubeml-platform/values.yaml").read_text())
    chart = yaml.safe_load((ROOT / "charts/kubeml-platform/Chart.yaml").read_text())
    assert values["image"]["repository"] == repository
    assert (values["image"]["tag"] or chart["appVersion"]) == tag
    runtime = image_ref("runtime").rpartition(":")[0]
    assert values["mlflow"]["image"]["repository"] == runtime
    for kustomization in sorted((ROOT / "manifests").rglob("kustomization.yaml")):
        entries = yaml.safe_load(kustomization.read_text()).get("images", [])
        assert {entry["name"] for entry in entries} <= {repository, runtime}, kustomization
        # Released together: one tag for both in an overlay.
        assert len({entry["newTag"] for entry in entries}) <= 1, kustomization
    base = list(yaml.safe_load_all((ROOT / "manifests/base/platform.yaml").read_text()))
    images = {d["metadata"]["name"]: c["image"] for d in base if d and d.get("kind") == "Deployment"
              for c in d["spec"]["template"]["spec"]["containers"]}
    assert images == {"kubeml-kubeml-platform-operator": image_ref("operator"),
                      "kubeml-kubeml-platform-mlflow": image_ref("runtime")}


def test_components_and_rayjob_run_the_runtime_image() -> None:
    from kubeml.components import IMAGE
    from kubeml.training.launchers.kuberay import KubeRayOptions

    assert IMAGE == image_ref("runtime")
    assert KubeRayOptions().image == image_ref("runtime")


def test_pipeline_compile_replaces_the_image_of_every_step(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from kubeml.cli import app

    out = tmp_path / "pipeline.yaml"
    custom = "123456789012.dkr.ecr.us-east-1.amazonaws.com/kubeml/kubeml-python:1.0"
    result = CliRunner().invoke(app, ["pipeline", "compile", "-o", str(out), "--image", custom])
    assert result.exit_code == 0, result.output
    docs = list(yaml.safe_load_all(out.read_text()))
    images = {e["container"]["image"] for d in docs if d and "deploymentSpec" in d
              for e in d["deploymentSpec"]["executors"].values()}
    assert images == {custom}
    result = CliRunner().invoke(app, ["pipeline", "compile", "-o", str(out), "--image", "Not An Image"])
    assert result.exit_code == 2
    assert "is not an image reference" in result.output
