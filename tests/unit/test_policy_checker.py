"""The policy checker itself: it reports what it should, and its waivers cannot rot.

The scanner tests run the real kube-score on deliberately bad manifests (skipped only when
it is not built: ``make policy-assets``); the waiver tests need nothing.
"""

from __future__ import annotations

import pytest
from kubeml.testing.policy import (
    Finding,
    PolicyError,
    Waiver,
    evaluate,
    load_waivers,
    scan,
    scannable,
)



def _pod(name="bad", **container):
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "team-a"},
            "spec": {"containers": [{"name": "app", "image": "example/app:1.0", **container}]}}


def test_a_privileged_pod_is_reported_and_fails_the_scan(scanner):
    findings, scored = scan({"bad": [_pod(securityContext={"privileged": True})]}, scanner)
    verdict = evaluate(findings, [])

    assert scored == {"bad": ["Pod/bad"]}
    privileged = [f for f in verdict.unwaived if f.check == "container-security-context-privileged"]
    assert privileged and privileged[0].object == "Pod/bad" and privileged[0].severity == "high"
    assert not verdict.ok
    assert "container-security-context-privileged on Pod/bad in bad" in verdict.report()


def test_an_annotation_in_the_manifest_cannot_hide_a_finding(scanner):
    pod = _pod(securityContext={"privileged": True})
    pod["metadata"]["annotations"] = {"kube-score/ignore": "container-security-context-privileged"}
    findings, _ = scan({"bad": [pod]}, scanner)

    assert any(f.check == "container-security-context-privileged" for f in evaluate(findings, []).unwaived)


def test_a_privileged_container_inside_a_rayjob_is_found_through_its_pod_template(scanner):
    rayjob = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "job", "namespace": "team-a"},
              "spec": {"rayClusterSpec": {
                  "headGroupSpec": {"template": {"spec": _pod()["spec"]}},
                  "workerGroupSpecs": [{"groupName": "cpu", "template": {
                      "spec": _pod(securityContext={"privileged": True})["spec"]}}]}}}
    findings, scored = scan({"bad": [rayjob]}, scanner)

    assert set(scored["bad"]) == {"Pod/job-head", "Pod/job-cpu-worker"}
    hit = [f for f in findings if f.check == "container-security-context-privileged"]
    assert [f.object for f in hit] == ["Pod/job-cpu-worker"]
    assert hit[0].origin == "RayJob/job spec.rayClusterSpec.workerGroupSpecs[0].template"


def test_a_custom_resource_with_containers_nobody_extracts_is_an_error():
    unknown = {"apiVersion": "example.io/v1", "kind": "Trainer", "metadata": {"name": "t"},
               "spec": {"template": {"spec": _pod()["spec"]}}}

    with pytest.raises(PolicyError, match="Trainer/t .* add an extractor"):
        scannable([unknown])


def _finding(check="container-image-pull-policy", obj="Pod/p", source="generated", severity="high"):
    return Finding(source, check, obj, severity)


def _waiver(check="container-image-pull-policy", obj="Pod/p", sources=("generated",)):
    return Waiver(check, obj, sources, "pinned tag, no secret in the image, registry dependence")


def test_a_waiver_covers_its_check_object_and_source_only():
    verdict = evaluate([_finding(), _finding(source="chart"), _finding(check="pod-probes")], [_waiver()])

    assert [f.source for f, _ in verdict.waived] == ["generated"]
    assert {(f.check, f.source) for f in verdict.unwaived} == {("container-image-pull-policy", "chart"),
                                                                ("pod-probes", "generated")}


def test_a_waiver_that_matches_no_high_finding_is_stale():
    verdict = evaluate([_finding(severity="medium")], [_waiver(sources=("generated", "chart"))])

    assert not verdict.ok and not verdict.unwaived
    assert sorted(source for _, source in verdict.stale) == ["chart", "generated"]
    assert "stale waiver" in verdict.report()


@pytest.mark.parametrize("body,message", [
    ("waivers:\n  - {check: c, object: Pod/p, sources: [generated]}\n", "lacks reason"),
    ("waivers:\n  - {check: c, object: Pod/p, sources: [generated], reason: ok}\n", "reason must say why"),
    ("waivers:\n  - {check: c, object: Pod/p, sources: generated, reason: a b c d e f}\n", "non-empty list"),
    ("waivers:\n  - {check: c, object: Pod/p, sources: [g], reason: a b c d e f, until: x}\n", "unknown keys until"),
    (("waivers:\n  - {check: c, object: Pod/p, sources: [g], reason: a b c d e f}\n"
      "  - {check: c, object: Pod/p, sources: [g], reason: a b c d e f}\n"), "a second time"),
    ("checks: []\n", "one key, `waivers`"),
])
def test_malformed_waivers_are_refused_with_the_entry_named(tmp_path, body, message):
    path = tmp_path / "waivers.yaml"
    path.write_text(body)

    with pytest.raises(PolicyError, match=message):
        load_waivers(path)


def test_the_project_waivers_file_loads_and_every_entry_has_a_reason():
    waivers = load_waivers()

    assert waivers and all(len(w.reason.split()) >= 20 for w in waivers)
