"""BundleModel and InputSignature in-process: readiness, validation, predictions."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

import kubeml.serving
from kubeml.bundle import load_bundle
from kubeml.serving.model import BundleModel, InputSignature
from kserve.errors import InvalidInput


def test_model_is_ready_only_after_load(digits_bundle):
    model = BundleModel("digits", digits_bundle, version="1")
    model.start()  # what ModelServer calls on registration; must not claim readiness
    assert not model.ready
    assert not asyncio.run(model.healthy())
    assert model.get_input_types() == []
    model.load()
    assert model.ready and asyncio.run(model.healthy())
    assert model.get_input_types() == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]


def test_predict_array_matches_bundle_module(digits_bundle, digits_rows):
    model = BundleModel("digits", digits_bundle)
    predictions, probabilities = model.predict_array(digits_rows)
    module, _ = load_bundle(digits_bundle)
    with torch.no_grad():
        expected = torch.softmax(module(torch.from_numpy(digits_rows)), dim=1).numpy()
    np.testing.assert_array_equal(predictions, expected.argmax(axis=1))
    np.testing.assert_allclose(probabilities, expected, atol=1e-6)
    assert predictions.dtype == np.int64 and probabilities.dtype == np.float32


SIGNATURE = InputSignature(shape=(4,), minimum=0.0, maximum=1.0, max_batch_size=3)


@pytest.mark.parametrize(
    "body, message",
    [
        ([[0.5] * 4], "not a JSON object"),
        ({"rows": []}, 'no "instances"'),
        ({"instances": []}, "non-empty list"),
        ({"instances": [[0.5] * 4] * 4}, "batch size 4"),
        ({"instances": [[0.5] * 3]}, "shape [1, 3]"),
        ({"instances": [[0.5] * 4, [0.5] * 3]}, "equally long"),
        ({"instances": [[float("nan")] * 4]}, "NaN"),
        ({"instances": [[float("inf")] * 4]}, "NaN or infinity"),
        ({"instances": [[2.0] * 4]}, "above the maximum 1"),
        ({"instances": [[-0.5] * 4]}, "below the minimum 0"),
        ({"instances": [[True, "x", 1, 1]]}, "numbers"),
    ],
)
def test_v1_validation_names_the_problem(body, message):
    with pytest.raises(InvalidInput, match=message.replace("[", r"\[").replace("]", r"\]")):
        SIGNATURE.features_from_v1(body)


def test_v1_accepts_valid_rows_as_model_dtype():
    features = SIGNATURE.features_from_v1({"instances": [[0, 0.5, 1, 0.25]]})
    assert features.dtype == np.float32 and features.shape == (1, 4)


def test_signature_rejects_unsupported_configuration():
    with pytest.raises(ValueError, match="datatype 'STRING'"):
        InputSignature(shape=(4,), datatype="STRING")
    with pytest.raises(ValueError, match="max_batch_size"):
        InputSignature(shape=(4,), max_batch_size=0)


def test_public_api_is_sorted_and_resolves():
    names = kubeml.serving.__all__
    assert list(names) == sorted(names)
    for name in names:
        assert getattr(kubeml.serving, name) is not None


def test_importing_serving_ignores_kserve_flags_on_the_command_line():
    # kserve parses sys.argv at import; a host process's flags must not reach it.
    import subprocess
    import sys

    code = (
        "import sys; sys.argv = ['prog', '--http_port', 'not-a-port', '--model_name', 'evil'];"
        "import kubeml.serving.model;"
        "from kserve.model_server import args;"
        "assert (args.http_port, args.model_name) == (8080, 'model'), args;"
        "assert sys.argv[1] == '--http_port'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
