"""ONNX Runtime model class: same answers and the same validation as the PyTorch one."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from kubeml.errors import BundleError
from kubeml.serving._kserve import InvalidInput
from kubeml.serving.model import BundleModel
from kubeml.serving.onnx_model import OnnxBundleModel, export_onnx


@pytest.fixture(scope="module")
def onnx_bundle(digits_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    bundle = tmp_path_factory.mktemp("onnx") / "digits"
    shutil.copytree(digits_bundle, bundle)
    export_onnx(bundle)
    return bundle


def test_onnx_runtime_answers_like_pytorch_for_every_batch_size(onnx_bundle, digits_rows):
    torch_model, onnx_model = BundleModel("d", onnx_bundle), OnnxBundleModel("d", onnx_bundle)
    for n in (1, 5):
        expected, expected_probs = torch_model.predict_array(digits_rows[:n])
        got, probs = onnx_model.predict_array(digits_rows[:n])
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_allclose(probs, expected_probs, atol=1e-5)
    assert onnx_model.ready


def test_onnx_model_validates_requests_like_the_pytorch_one(onnx_bundle):
    with pytest.raises(InvalidInput, match="above the maximum"):
        OnnxBundleModel("d", onnx_bundle).predict_array(np.full((1, 64), 99.0))


def test_bundle_without_onnx_file_says_how_to_make_one(digits_bundle):
    with pytest.raises(BundleError, match="export_onnx"):
        OnnxBundleModel("d", digits_bundle).load()
