"""The payload spool on its own: bound, segments, replay bookkeeping and restarts.

The spool's part in the Kafka sink (records kept while the broker is down and sent once it
answers) is tested against a real broker in ``tests/integration/test_payload_kafka.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubeml.serving.telemetry.spool import PayloadSpool


def _record(i: int) -> bytes:
    return json.dumps({"request_id": f"req-{i:05d}", "n": i}, separators=(",", ":")).encode()


SIZE = len(_record(0)) + 1


def test_the_bound_counts_every_byte_held_taken_segments_included(tmp_path: Path):
    spool = PayloadSpool(tmp_path, max_bytes=3 * SIZE)
    assert [spool.append(_record(i)) for i in range(4)] == [True, True, True, False]
    segment, records = spool.take()
    assert records == [_record(i) for i in range(3)]
    # Taken but not yet done: still on disk, still inside the bound.
    assert (spool.records, spool.waiting, spool.bytes) == (3, 0, 3 * SIZE)
    assert not spool.append(_record(3))
    spool.done(segment)
    assert not segment.exists() and spool.bytes == 0
    assert spool.append(_record(3))


def test_records_come_back_oldest_segment_first_and_appends_go_to_a_new_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(PayloadSpool, "SEGMENT_BYTES", 2 * SIZE)
    spool = PayloadSpool(tmp_path, max_bytes=100 * SIZE)
    for i in range(5):
        spool.append(_record(i))
    assert len(list(tmp_path.glob("*.jsonl"))) == 3  # 2 + 2 + 1
    seen = []
    while (taken := spool.take()) is not None:
        segment, records = taken
        seen += records
        if len(seen) == 2:  # a record sent from the first segment failed again: spooled anew
            spool.append(records[0])
        spool.done(segment)
    assert seen == [_record(i) for i in range(5)] + [_record(0)]
    assert spool.records == 0 and not list(tmp_path.glob("*.jsonl"))


def test_a_new_spool_adopts_what_the_last_one_left_and_cuts_a_torn_record(tmp_path: Path):
    first = PayloadSpool(tmp_path, max_bytes=100 * SIZE)
    for i in range(3):
        first.append(_record(i))
    first.close()
    # A crash in the middle of a write leaves half a line at the end of the last segment.
    segment = sorted(tmp_path.glob("*.jsonl"))[-1]
    with segment.open("ab") as f:
        f.write(_record(3)[:10])

    second = PayloadSpool(tmp_path, max_bytes=100 * SIZE)
    assert (second.records, second.torn) == (3, 1)
    second.append(_record(4))  # into a segment after the adopted one
    taken = []
    while (t := second.take()) is not None:
        taken += t[1]
        second.done(t[0])
    assert taken == [_record(i) for i in (0, 1, 2, 4)]


def test_bad_input_is_refused_with_a_clear_error(tmp_path: Path):
    with pytest.raises(ValueError, match="max_bytes must be positive"):
        PayloadSpool(tmp_path, max_bytes=0)
    spool = PayloadSpool(tmp_path, max_bytes=1024)
    with pytest.raises(ValueError, match="one line of JSON"):
        spool.append(b'{"a":\n1}')
    assert spool.records == 0
