"""`vlpatch doctor` on the installed LLaMA-Factory: versions, states, drift, a real self-test, exit code."""

import json
import os
import sys

import pytest
import yaml

import vlpatch.matrix as vmatrix
from tests.conftest import newest_only, require
from tests.fixtures import console
from tests.fixtures import matrix_copy

BIN = os.path.dirname(sys.executable)

pytestmark = pytest.mark.heavy  # each test runs `vlpatch doctor` in a subprocess


def doctor(*args, **env):
    full = {k: v for k, v in os.environ.items() if not k.startswith("VLPATCH")}
    full.update(HF_HUB_OFFLINE="1", **env)
    proc = console.run([os.path.join(BIN, "vlpatch"), "doctor", *args], env=full, timeout=300)
    return proc


@pytest.fixture(scope="module")
def lf_version():
    require("llamafactory")
    import importlib.metadata

    return importlib.metadata.version("llamafactory")


def test_doctor_all_good(lf_version, tmp_path):
    proc = doctor("--json", TMPDIR=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("vlpatch-")], "the self-tests leave no temporary directory"
    data = json.loads(proc.stdout)
    assert data["versions"]["llamafactory"] == lf_version and data["versions"]["torch"]
    assert data["autoenable"]["pth_installed"] and not data["autoenable"]["active"]
    row = next(r for r in data["patches"] if r["id"] == "llamafactory.truncation")
    assert row["state"] == "applied" and all(d["found"] == d["expected"] for d in row["drift"].values())
    checks = {c["check"]: c for c in row["selftest"]}
    assert set(checks) == {"wrapped", "revert", "re-apply", "functional"} and all(c["ok"] for c in checks.values()), checks
    assert "image run whole" in checks["functional"]["detail"]
    header = next(r for r in data["patches"] if r["id"] == "llamafactory.header_tokens")
    assert header["state"] == "applied" and all(c["ok"] for c in header["selftest"]), header
    assert "3 of 3 images counted from headers" in {c["check"]: c for c in header["selftest"]}["functional"]["detail"]
    assert data["problems"] == []


def test_doctor_human_output_and_autoenable(lf_version):
    newest_only("llamafactory", "vlpatch's own doctor logic")
    proc = doctor(VLPATCH="1")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "auto-enable: active in this interpreter (VLPATCH=1" in proc.stdout
    assert f"llamafactory.truncation: applied ({lf_version})" in proc.stdout
    assert "self-test functional: ok" in proc.stdout


def test_doctor_fails_when_an_enabled_patch_cannot_apply(lf_version, tmp_path):
    # the installed release no longer tested in a copy of the matrix: a known code shape that no tested
    # release has, as a user of an untested release sees it; a trainer process would stop at its import
    path, _ = matrix_copy.untested(tmp_path, {"llamafactory": lf_version})
    proc = doctor(VLPATCH_MATRIX=path)
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "llamafactory.truncation: refused" in proc.stdout and "problems:" in proc.stdout
    assert f"llamafactory {lf_version}: its code shape ({lf_version} - {lf_version}) is known but no tested release has it" in proc.stdout
    assert "REFUSED, a trainer process with VLPATCH=1 or apply() stops at its import" in proc.stdout
    assert "fingerprints vs " in proc.stdout  # drift is still measured against the nearest tested release


def test_doctor_names_the_tested_release_that_vouches_for_the_code(lf_version, tmp_path):
    # the installed release's tested entry renamed: protected only because its code equals a tested release's
    newest_only("llamafactory", "vlpatch's own doctor logic")
    path, _ = matrix_copy.vouched(tmp_path, {"llamafactory": lf_version})
    proc = doctor("--no-selftest", VLPATCH_MATRIX=path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert (f"llamafactory.truncation: applied ({lf_version}) - {lf_version}: code identical to tested {lf_version}.post99"
            in proc.stdout), proc.stdout
    assert f"fingerprints vs {lf_version}.post99: " in proc.stdout and "DRIFTED" not in proc.stdout


def _matrix_without_installed(lf_version, tmp_path):
    return matrix_copy.untested(tmp_path, {"llamafactory": lf_version})[0]


def test_doctor_fails_on_a_forced_patch_unless_accepted(lf_version, tmp_path):
    newest_only("llamafactory", "vlpatch's own doctor logic")
    path = _matrix_without_installed(lf_version, tmp_path)
    proc = doctor(VLPATCH_MATRIX=path, VLPATCH_FORCE="1")
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert f"llamafactory.truncation: FORCED onto llamafactory {lf_version}, which the matrix does not list" in proc.stdout
    proc = doctor("--accept-forced", VLPATCH_MATRIX=path, VLPATCH_FORCE="1")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "accepted (--accept-forced): llamafactory.truncation, llamafactory.header_tokens forced" in proc.stdout


@pytest.mark.parametrize("env,text", [
    ({"VLPATCH_POLICY": "dropmedia"}, "invalid setting: VLPATCH_POLICY='dropmedia' is not a policy"),
    ({"VLPATCH_PATCHES": "llamafactory.truncaton"}, "invalid setting: VLPATCH_PATCHES='llamafactory.truncaton' is not a patch id"),
])
def test_doctor_fails_on_an_invalid_setting(lf_version, env, text):
    newest_only("llamafactory", "vlpatch's own doctor logic")
    proc = doctor(**env)
    assert proc.returncode == 1 and text in proc.stdout and "did you mean" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]


def test_doctor_tells_excluded_from_not_installed(lf_version):
    newest_only("llamafactory", "vlpatch's own doctor logic")
    proc = doctor("--no-selftest", VLPATCH_EXCLUDE="llamafactory.header_tokens")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert f"llamafactory.header_tokens: excluded ({lf_version}) - excluded by you (VLPATCH_EXCLUDE)" in proc.stdout
    assert "unsloth.collator: skipped (not installed) - unsloth_zoo is not installed" in proc.stdout
