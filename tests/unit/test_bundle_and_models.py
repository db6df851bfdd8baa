import pytest
import torch

from kubeml.bundle import SPEC_FILE, WEIGHTS_FILE, BundleSpec, load_bundle, save_bundle
from kubeml.errors import BundleError, ConfigError
from kubeml.models import available_models, build_model


def spec():
    return BundleSpec(arch="digits_cnn", input_shape=(64,), classes=tuple("0123456789"), input_min=0, input_max=16)


def test_model_accepts_flat_and_image_shaped_input():
    m = build_model("digits_cnn").eval()
    x = torch.rand(3, 64) * 16
    torch.testing.assert_close(m(x), m(x.view(3, 8, 8)))
    assert m(x.view(3, 1, 8, 8)).shape == (3, 10)


def test_unknown_model_and_bad_kwargs_are_config_errors():
    with pytest.raises(ConfigError, match="available models: digits_cnn"):
        build_model("resnet9000")
    with pytest.raises(ConfigError, match="bad arguments"):
        build_model("digits_cnn", layers=3)
    assert "digits_cnn" in available_models()


def test_bundle_round_trip_reproduces_outputs(tmp_path):
    torch.manual_seed(0)
    model = build_model("digits_cnn").eval()
    saved = save_bundle(tmp_path, model, spec())
    assert len(saved.weights_sha256) == 64
    loaded, s = load_bundle(tmp_path)
    x = torch.rand(5, 64) * 16
    torch.testing.assert_close(loaded(x), model(x))
    assert s.input_shape == (64,) and s.classes[3] == "3"


def test_truncated_weights_are_detected(tmp_path):
    save_bundle(tmp_path, build_model("digits_cnn"), spec())
    w = tmp_path / WEIGHTS_FILE
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(BundleError, match="checksum mismatch"):
        load_bundle(tmp_path)


def test_missing_or_corrupt_spec_is_a_bundle_error(tmp_path):
    with pytest.raises(BundleError, match="is missing"):
        load_bundle(tmp_path)
    (tmp_path / SPEC_FILE).write_text("{not json")
    with pytest.raises(BundleError, match="invalid"):
        load_bundle(tmp_path)


def test_newer_bundle_format_is_refused(tmp_path):
    save_bundle(tmp_path, build_model("digits_cnn"), spec())
    p = tmp_path / SPEC_FILE
    p.write_text(p.read_text().replace('"format_version": 1', '"format_version": 99'))
    with pytest.raises(BundleError, match="upgrade kubeml"):
        load_bundle(tmp_path)
