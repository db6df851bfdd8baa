"""10,000 generated malformed payloads against a real model server.

Every one must get a 4xx with a JSON error object, none a 5xx; the server process must
never restart; valid requests must keep succeeding between batches. The payloads are
generated from a fixed seed, so a failure reproduces.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from kubeml.serving import ServedModel, ServingManager

pytestmark = pytest.mark.slow

TOTAL = 10_000
#: A valid request is interleaved every this many malformed ones.
CHECK_EVERY = 250
#: Above the server's default 4 MiB body limit.
OVERSIZED = 5 * 1024 * 1024
ROW = [float(i % 17) for i in range(64)]


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory, digits_bundle: Path) -> Iterator[tuple[ServingManager, ServedModel]]:
    manager = ServingManager(tmp_path_factory.mktemp("fuzz-state"))
    try:
        yield manager, manager.deploy("digits", digits_bundle, version="1")
    finally:
        manager.stop()


def _v2(inputs) -> str:
    return json.dumps({"inputs": inputs})


def _tensor(**over) -> dict:
    t = {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": list(ROW)}
    t.update(over)
    return t


def _nested(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


def generate(rng: random.Random) -> Iterator[tuple[str, str, str | bytes]]:
    """Yields (category, path, body) for TOTAL malformed requests."""
    infer, predict = "/v2/models/digits/infer", "/v1/models/digits:predict"
    valid = _v2([_tensor()])
    makers = {
        "broken-json": lambda: (infer, valid[: rng.randrange(1, len(valid) - 1)]),
        "random-bytes": lambda: (infer, bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))),
        "wrong-datatype": lambda: (infer, _v2([_tensor(datatype=rng.choice(["BYTES", "BOOL", "FP99", "", "int", 7]))])),
        "string-data": lambda: (infer, _v2([_tensor(data=[rng.choice(["a", "1x", "", None, {}, []])] * 64)])),
        "shape-mismatch": lambda: (infer, _v2([_tensor(shape=[1, rng.choice([1, 63, 65, 128])])])),
        "data-count-mismatch": lambda: (infer, _v2([_tensor(data=ROW[: rng.randrange(0, 63)])])),
        "huge-shape": lambda: (infer, _v2([_tensor(shape=[rng.choice([10**9, 10**12, 2**63 - 1]), 64])])),
        "negative-shape": lambda: (infer, _v2([_tensor(shape=[rng.choice([-1, -64, -(2**31)]), 64])])),
        "bad-shape-type": lambda: (infer, _v2([_tensor(shape=rng.choice(["1,64", None, [1.5, 64], [[1], 64], {}]))])),
        "nan-inf": lambda: (infer, _v2([_tensor()]).replace("1.0", rng.choice(["NaN", "Infinity", "-Infinity"]), 1)),
        "out-of-range": lambda: (infer, _v2([_tensor(data=[rng.choice([-1.0, 17.0, 1e30, -1e30])] * 64)])),
        "deep-nesting": lambda: (infer, '{"inputs": ' + _nested(rng.randrange(100, 5000)) + "}"),
        "missing-fields": lambda: (infer, json.dumps(rng.choice([{}, {"inputs": None}, {"inputs": {}}, {"inputs": [{}]},
                                                                  {"inputs": [{"name": "input"}]}, {"outputs": []}, [], 3]))),
        "wrong-input-name": lambda: (infer, _v2([_tensor(name=rng.choice(["x", "", None, 5]))])),
        "too-many-inputs": lambda: (infer, _v2([_tensor(), _tensor(name="extra")])),
        "unknown-model": lambda: (f"/v2/models/m{rng.randrange(10**6)}/infer", valid),
        "v1-bad-instances": lambda: (predict, json.dumps({"instances": rng.choice([[[0] * 5], [["a"] * 64], "x", None, [[ROW]], {}])})),
        "v1-missing": lambda: (predict, json.dumps(rng.choice([{}, {"inputs": 1}, [], "instances"]))),
    }
    names = sorted(makers)
    oversized_every = TOTAL // 20  # 20 oversized bodies: each is 5 MiB over loopback
    for i in range(TOTAL):
        if i % oversized_every == oversized_every - 1:
            yield "oversized", infer, b'{"inputs": [' + b" " * OVERSIZED + b"]}"
            continue
        name = names[i % len(names)]
        path, body = makers[name]()
        yield name, path, body


def test_ten_thousand_malformed_payloads_get_4xx_json_and_never_a_5xx(deployed):
    manager, server = deployed
    rng = random.Random(20261127)
    session = requests.Session()
    headers = {"Content-Type": "application/json"}
    statuses: Counter = Counter()
    bad: list[str] = []
    sent = 0
    for category, path, body in generate(rng):
        r = session.post(server.url + path, data=body, headers=headers, timeout=60)
        sent += 1
        statuses[r.status_code] += 1
        try:
            payload = r.json()
        except ValueError:
            payload = None
        if not (400 <= r.status_code < 500) or not isinstance(payload, dict) or "error" not in payload:
            bad.append(f"{category} {path} -> {r.status_code} {r.text[:120]!r}")
        if sent % CHECK_EVERY == 0:
            ok = session.post(server.url + "/v2/models/digits/infer", data=_v2([_tensor()]), headers=headers, timeout=60)
            assert ok.status_code == 200, f"valid request failed after {sent} malformed ones: {ok.text}"
    assert sent == TOTAL
    assert not bad, f"{len(bad)} of {TOTAL} malformed requests were not a 4xx JSON error:\n" + "\n".join(bad[:20])
    assert not any(500 <= s for s in statuses), statuses
    # The same process answered throughout: the server never restarted.
    live = manager.get("digits")
    assert live is not None and live.pid == server.pid and live.alive and live.ready
