"""evaluate: accuracy, macro-F1 and the confusion matrix on the held-out split."""

from typing import NamedTuple

from kfp import dsl

from kubeml.components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(
    config_json: str, run_id: str, dataset: str, version: str, bundle_key: str
) -> NamedTuple("EvalOutputs", [("accuracy", float), ("macro_f1", float)]):
    from collections import namedtuple

    from kubeml.pipelines.stages import evaluate_stage

    accuracy, macro_f1 = evaluate_stage(config_json, run_id, dataset, version, bundle_key)
    return namedtuple("EvalOutputs", ["accuracy", "macro_f1"])(accuracy, macro_f1)
