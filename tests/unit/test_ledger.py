import pytest

from kubeml.artifacts import FileStore
from kubeml.errors import DataValidationError, KubemlError
from kubeml.ledger import STAGES, Ledger


def test_stage_records_success_failure_and_pending(tmp_path):
    ledger = Ledger(FileStore(tmp_path), "r1")
    with ledger.stage("ingest") as rec:
        rec.outputs = {"version": "v-1"}
    with pytest.raises(DataValidationError):
        with ledger.stage("validate"):
            raise DataValidationError(["value range: max 20 > 16"])
    with pytest.raises(ZeroDivisionError):
        with ledger.stage("train"):
            1 / 0
    recs = {r.stage: r for r in ledger.all()}
    assert [r.stage for r in ledger.all()] == list(STAGES)
    assert recs["ingest"].status == "succeeded" and recs["ingest"].outputs == {"version": "v-1"}
    assert recs["validate"].status == "failed" and "max 20 > 16" in recs["validate"].error
    assert recs["train"].status == "failed" and "Traceback" in recs["train"].error
    assert recs["evaluate"].status == "pending" and recs["evaluate"].duration_s is None
    assert recs["ingest"].duration_s >= 0


def test_bad_run_ids_are_refused(tmp_path):
    for bad in ("", "a/b", ".hidden"):
        with pytest.raises(KubemlError):
            Ledger(FileStore(tmp_path), bad)
