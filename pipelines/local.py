"""Run the training pipeline on the local target: ``kfp.local`` with the subprocess runner.

``python -m kubeml.pipelines.local --config-file F --run-id R`` is what ``kubeml run``
starts in a child process, with the task logs going to a file, while it shows progress
from the run ledger.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

__all__ = ["install_condition_fix", "run_local"]

# kfp.local (2.14-2.16) compiles ``dsl.If(task.output == "x")`` to the condition
# ``inputs.parameter_values['pipelinechannel--task-Output'] == 'x'`` but its evaluator only
# substitutes the bare ``pipelinechannel--...`` name, leaving ``inputs.parameter_values[''x'']``:
# a syntax error it logs and then treats as False, silently skipping the branch. On a
# Kubeflow backend the same IR is evaluated correctly. We strip the accessor before
# kfp.local substitutes, so both targets take the same branch.
#
# Its evaluator also runs the condition as Python, while KFP writes CEL: ``dsl.Elif`` and
# ``dsl.Else`` compile to ``!(a) && b``, which Python cannot parse, so every branch of an
# If/Elif/Else was skipped. We turn CEL's ``!``, ``&&`` and ``||`` into Python's.
#
# And it sends a pipeline whose root DAG has no condition or loop of its own to an
# orchestrator that ignores conditions altogether, running every branch of an
# If/Elif/Else (whose conditions sit one DAG down). We send every pipeline to the one that
# evaluates them. tests/unit/test_pipeline.py checks all three on the real kfp.local.
_CHANNEL_ACCESS = re.compile(r"inputs\.parameter_values\[\s*'(pipelinechannel--[A-Za-z0-9_\-]+)'\s*\]")
_CEL_NOT = re.compile(r"!(?!=)")
_CHANNEL = re.compile(r"pipelinechannel--[A-Za-z0-9_\-]+")


def _python_condition(condition: str) -> str:
    """A KFP (CEL) trigger condition as the Python expression kfp.local evaluates."""
    text = _CHANNEL_ACCESS.sub(r"\1", condition or "")
    return _CEL_NOT.sub(" not ", text.replace("&&", " and ").replace("||", " or "))


def install_condition_fix() -> None:
    """Make kfp.local evaluate ``dsl.If``/``Elif``/``Else`` conditions on task outputs (idempotent)."""
    from kfp.local.orchestrator import dag_orchestrator
    from kfp.local.orchestrator import enhanced_dag_orchestrator as orchestrator

    evaluator = orchestrator.ConditionEvaluator
    if getattr(evaluator, "_kubeml_condition_fix", False):
        return
    original = evaluator.evaluate_condition

    def evaluate_condition(condition, io_store):
        text = _python_condition(condition)
        # Inside a branch's DAG, a task output of the DAG above arrives as an input of the
        # branch, under the channel's full name; kfp.local looks for it as a task output.
        for channel in sorted(set(_CHANNEL.findall(text)), key=len, reverse=True):
            try:
                value = io_store.get_parent_input(channel)
            except (KeyError, ValueError):
                continue
            text = text.replace(channel, repr(value))
        return original(text, io_store)

    evaluator.evaluate_condition = staticmethod(evaluate_condition)
    evaluator._kubeml_condition_fix = True
    # Same arguments; the enhanced runner handles plain DAGs as well.
    dag_orchestrator.run_dag = orchestrator.run_enhanced_dag


def run_local(config_json: str, run_id: str, code_version: str, pipeline_root: str) -> None:
    from kfp import local

    from kubeml.pipelines.training import training_pipeline

    install_condition_fix()
    Path(pipeline_root).mkdir(parents=True, exist_ok=True)
    # use_venv=False: tasks run in this interpreter's environment, where kubeml is installed.
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=pipeline_root, raise_on_error=True)
    training_pipeline(config_json=config_json, run_id=run_id, code_version=code_version)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kubeml.pipelines.local")
    p.add_argument("--config-file", required=True, help="resolved EnvironmentConfig as JSON")
    p.add_argument("--run-id", required=True)
    p.add_argument("--code-version", default="unknown")
    p.add_argument("--pipeline-root", required=True)
    a = p.parse_args(argv)
    try:
        run_local(Path(a.config_file).read_text(), a.run_id, a.code_version, a.pipeline_root)
    except Exception as exc:  # the ledger holds the stage's own error; this is the orchestrator's view
        print(f"pipeline failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
