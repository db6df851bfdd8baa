"""The pipeline definition: compiles, loads with kfp's own loader, and its gate branches work under kfp.local."""


import json
from pathlib import Path

import pytest
import yaml
from kfp import compiler, dsl, local
from kfp.components import load_component_from_file

from kubeml.ledger import STAGES
from kubeml.pipelines.local import install_condition_fix
from kubeml.pipelines.training import PIPELINE_NAME, training_pipeline


def _all_tasks(spec: dict) -> list[str]:
    """Task names of the root DAG and of every nested (condition) DAG."""
    names = []
    comps = spec["components"]

    def walk(dag):
        for name, task in dag["tasks"].items():
            ref = task["componentRef"]["name"]
            sub = comps.get(ref, {}).get("dag")
            if sub:
                walk(sub)
            else:
                names.append(name)

    walk(spec["root"]["dag"])
    return names


def test_compiled_pipeline_loads_with_kfp_and_has_one_task_per_stage(tmp_path: Path):
    out = tmp_path / "pipeline.yaml"
    compiler.Compiler().compile(training_pipeline, str(out))
    loaded = load_component_from_file(str(out))
    assert loaded.name == PIPELINE_NAME
    spec = yaml.safe_load(out.read_text())
    # One task per ledger stage, and the step that makes the configuration artifact.
    assert sorted(_all_tasks(spec)) == sorted((*STAGES, "configure"))
    # register and deploy only run inside the gate's branch
    condition = spec["components"]["comp-condition-1"]["dag"]["tasks"]
    assert set(condition) == {"register", "deploy"}
    assert "gate-Output" in spec["root"]["dag"]["tasks"]["condition-1"]["triggerPolicy"]["condition"]
    # Only the train step retries (it resumes from checkpoints / adopts its cluster job).
    retried = {name: t["retryPolicy"] for name, t in spec["root"]["dag"]["tasks"].items() if "retryPolicy" in t}
    assert list(retried) == ["train"]
    assert retried["train"]["maxRetryCount"] == 2


def test_cli_compile_writes_the_same_pipeline(tmp_path: Path):
    from typer.testing import CliRunner

    from kubeml.cli import app

    out = tmp_path / "p.yaml"
    result = CliRunner().invoke(app, ["pipeline", "compile", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(_all_tasks(yaml.safe_load(out.read_text()))) == sorted((*STAGES, "configure"))


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def _say(word: str) -> str:
    return word


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def _record(path: str, value: str):
    with open(path, "a") as f:
        f.write(value + "\n")


@dsl.pipeline(name="branching")
def _branching(word: str, path: str):
    said = _say(word=word)
    with dsl.If(said.output == "yes"):
        _record(path=path, value="yes-branch")
    # Two Ifs, not If/Else: kfp.local (2.16) routes If/Else pipelines to an orchestrator
    # that ignores trigger conditions and runs both branches. Our pipelines use only dsl.If.
    with dsl.If(said.output != "yes"):
        _record(path=path, value="no-branch")


@pytest.mark.slow
@pytest.mark.parametrize("word,branch", [("yes", "yes-branch"), ("no", "no-branch")])
def test_kfp_local_takes_the_right_branch_on_a_task_output(tmp_path: Path, word: str, branch: str):
    install_condition_fix()
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    marker = tmp_path / "taken.txt"
    _branching(word=word, path=str(marker))
    assert marker.read_text().split() == [branch]


@dsl.pipeline(name="three-way")
def _three_way(word: str, path: str):
    said = _say(word=word)
    with dsl.If(said.output == "yes"):
        _record(path=path, value="yes-branch")
    with dsl.Elif(said.output == "maybe"):
        _record(path=path, value="maybe-branch")
    with dsl.Else():
        _record(path=path, value="else-branch")
    _record(path=path, value="after")


@pytest.mark.slow
@pytest.mark.parametrize("word,branch", [("yes", "yes-branch"), ("maybe", "maybe-branch"), ("no", "else-branch")])
def test_kfp_local_takes_exactly_one_branch_of_if_elif_else(tmp_path: Path, word: str, branch: str):
    """Without kubeml's fix kfp.local ran every branch (or, with a loop beside it, none)."""
    install_condition_fix()
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    marker = tmp_path / "taken.txt"
    _three_way(word=word, path=str(marker))
    assert sorted(marker.read_text().split()) == sorted([branch, "after"])


def test_component_python_funcs_run_the_stages(tmp_path: Path):
    """configure -> ingest -> validate -> gate through the components' own functions, with
    their typed artifacts, as KFP's executor would call them."""
    from kubeml.artifacts import FileStore
    from kubeml.components.configure.component import configure
    from kubeml.components.gate.component import gate
    from kubeml.components.ingest.component import ingest
    from kubeml.components.validate.component import validate
    from kubeml.config import EnvironmentConfig
    from kubeml.ledger import Ledger

    cfg = EnvironmentConfig.model_validate(
        {"data": {"max_rows": 200}, "artifact_store": {"uri": f"file://{tmp_path}/a"}, "home": str(tmp_path)}
    ).resolved(tmp_path)
    config = dsl.Artifact(uri=str(tmp_path / "out" / "config"))
    configure.python_func(config_json=cfg.model_dump_json(), config=config)
    assert config.metadata["environment"] == "dev" and json.loads(Path(config.path).read_text())["data"]["max_rows"] == 200
    data = dsl.Dataset(uri=str(tmp_path / "out" / "data"))
    ingest.python_func(config=config, run_id="r1", data=data)
    assert data.metadata["dataset"] == "digits" and data.metadata["rows"] == 200
    assert json.loads(Path(data.path).read_text())["version"] == data.metadata["version"]
    report = json.loads(validate.python_func(config=config, run_id="r1", data=data))
    assert report["rows"] == 200
    metrics = dsl.Metrics(uri=str(tmp_path / "out" / "metrics"))
    metrics.log_metric("accuracy", 0.99)
    metrics.log_metric("macro_f1", 0.99)
    assert gate.python_func(config=config, run_id="r1", metrics=metrics) == "passed"
    metrics.log_metric("accuracy", 0.5)
    assert gate.python_func(config=config, run_id="r1", metrics=metrics) == "failed"
    rec = Ledger(FileStore(tmp_path / "a"), "r1").read("gate")
    assert rec.outputs["reasons"] == ["accuracy 0.5000 < min_accuracy 0.9500"]


def test_a_step_given_an_artifact_it_did_not_write_says_so(tmp_path: Path):
    from kubeml.errors import ConfigError
    from kubeml.pipelines.stages.artifacts import dataset_of, metric_of, model_of

    with pytest.raises(ConfigError, match="has no 'dataset' in its metadata: it was not written by kubeml's ingest"):
        dataset_of(dsl.Dataset(uri=str(tmp_path / "d")))
    with pytest.raises(ConfigError, match="has no 'bundle_key'"):
        model_of(dsl.Model(uri=str(tmp_path / "m")))
    with pytest.raises(ConfigError, match="has no 'macro_f1'"):
        metric_of(dsl.Metrics(uri=str(tmp_path / "x")), "macro_f1")
