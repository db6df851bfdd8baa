"""evaluate: accuracy, macro-F1 and the confusion matrix on the held-out split, and a report with the curves."""

from kfp import dsl

from kubeml.components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(
    config: dsl.Input[dsl.Artifact],
    run_id: str,
    data: dsl.Input[dsl.Dataset],
    model: dsl.Input[dsl.Model],
    metrics: dsl.Output[dsl.Metrics],
    confusion: dsl.Output[dsl.ClassificationMetrics],
    report: dsl.Output[dsl.HTML],
):
    from kubeml.pipelines.stages import evaluate_stage
    from kubeml.pipelines.stages.artifacts import config_json_of, dataset_of, model_of, write_evaluation

    config_json = config_json_of(config)
    evaluate_stage(config_json, run_id, *dataset_of(data), model_of(model))
    write_evaluation(config_json, run_id, metrics, confusion, report)
