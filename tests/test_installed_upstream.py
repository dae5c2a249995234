"""What vlpatch does with the upstream release installed in this environment, on its real code.

Runs in every smoke session (scripts/sessions.py), including the ones that hold a release the
matrix does not cover (`expect: refused`) and the canary's newest releases:
* a tested release: its patch attaches (every wrapped target is vlpatch's), revert() puts back the
  very same objects;
* a release the matrix does not list (or one removed from a copy of the matrix, to stand for the
  next upstream release): every patch of it is refused with one warning naming the version, and
  every target is upstream's own object.
Each check runs in a fresh interpreter so that nothing else in the test process is patched: one
interpreter for every upstream installed here at once (as a user's training process imports them), one
for the stand-in of their next releases; each test reads its upstream's part.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

import pytest
import yaml

from packaging.version import Version

import vlpatch.matrix as vmatrix

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPECT = os.environ.get("VLPATCH_EXPECT", "")
STRICT = {m.strip() for m in os.environ.get("VLPATCH_STRICT", "").split(",") if m.strip()}

PROBE = r"""
import importlib, json, sys, logging
sys.path.insert(0, sys.argv[1])
import vlpatch, wrapt
from vlpatch import _wrap, engine, matrix
dists = sys.argv[2:]
vlpatch.apply()
specs = [s for s in matrix.load().patches if s.distribution in dists]
from importlib.metadata import version as _version
from packaging.version import Version
installed = {d: Version(_version(d)) for d in dists}
# a hook module of patches that have nothing to patch in this release (`absent`) is not imported: it may not
# import alone there (TRL 0.24.0's dpo_trainer under transformers 5.6 in a fresh interpreter)
needed = {s.hook for s in specs if s.absent is None or installed[s.distribution] not in s.absent}
for hook in sorted(needed):
    if hook.startswith("unsloth_zoo"):
        from tests.fixtures.unsloth_import import import_vision_utils  # the CPU recipe
        import_vision_utils()
    else:
        importlib.import_module(hook)
def targets(spec):
    out = {}
    for t in spec.targets:
        try:
            _, _, obj = wrapt.resolve_path(importlib.import_module(t.module), t.symbol)
        except Exception as exc:
            out[t.key] = "missing"
            continue
        out[t.key] = "vlpatch" if isinstance(obj, _wrap.Patched) else "upstream"
    return out
before = {s.id: targets(s) for s in specs}
states = {row["id"]: row for row in vlpatch.status()}
vlpatch.revert()
after = {s.id: targets(s) for s in specs}
print("PROBE " + json.dumps({"states": states, "patched": before, "reverted": after}))
"""

pytestmark = pytest.mark.heavy  # each test probes the installed upstream in a subprocess


def installed() -> list:
    out = []
    for dist in sorted({s.distribution for s in vmatrix.load().patches}):
        try:
            out.append((dist, importlib.metadata.version(dist)))
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def probe(dists: list, matrix_path: str | None = None) -> tuple:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLPATCH")}
    if matrix_path:
        env["VLPATCH_MATRIX"] = matrix_path
    proc = subprocess.run([sys.executable, "-c", PROBE, ROOT, *dists], env=env, capture_output=True, text=True, timeout=300)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("PROBE ")), None)
    assert line, proc.stderr[-3000:]
    return json.loads(line[6:]), proc.stderr


@pytest.fixture(scope="module")
def probed():
    """{matrix path or None: (probe output, stderr)} for every installed upstream at once, each probe run
    on first use (one interpreter each, not one per upstream: each costs seconds of imports)."""
    cache: dict = {}

    def get(matrix_path: str | None = None) -> tuple:
        if matrix_path not in cache:
            cache[matrix_path] = probe([d for d, _ in installed()], matrix_path)
        return cache[matrix_path]

    return get


@pytest.fixture(scope="module")
def next_releases(tmp_path_factory) -> tuple:
    """Stand-in for every installed upstream's next release: a copy of the matrix without the installed
    releases (their `tested` entries and fingerprints). (path, {distribution: the patch ids touched})."""
    with open(vmatrix.MATRIX_PATH, encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    versions = dict(installed())
    touched: dict = {}
    for raw in data["patches"]:
        version = versions.get(raw["distribution"])
        if version is not None and version in [str(v) for v in raw.get("tested", [])]:
            raw["tested"] = [v for v in raw["tested"] if str(v) != version]
            raw["fingerprints"].pop(version, None)
            touched.setdefault(raw["distribution"], []).append(raw["id"])
    path = tmp_path_factory.mktemp("next_release") / "matrix.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path), touched


def pytest_generate_tests(metafunc):
    if "upstream" in metafunc.fixturenames:
        found = installed()
        metafunc.parametrize("upstream", found or [None], ids=[f"{d}-{v}" for d, v in found] or ["none"])


def test_installed_release_is_patched_or_refused(upstream, probed):
    if upstream is None:
        pytest.skip("no upstream of the matrix is installed here")
    dist, version = upstream
    specs = [s for s in vmatrix.load().patches if s.distribution == dist]
    tested = [s for s in specs if version in s.tested]
    # releases without the code a patch is for (`absent`: TRL before its vision collators): nothing to patch
    absent = [s for s in specs if s.absent is not None and Version(version) in s.absent]
    if not STRICT or dist in STRICT:  # the session's own upstream: its `expect` must agree with the matrix
        assert bool(tested) != (EXPECT == "refused"), f"{dist} {version}: the session's `expect` disagrees with the matrix"
    # another upstream installed beside it (TRL under LLaMA-Factory and unsloth_zoo): the matrix alone decides
    out, stderr = probed()
    # targets a patch that applies here wraps (sibling patches for other releases share some of them)
    ours = {t.key for s in specs if out["states"][s.id]["state"] == "applied" for t in s.targets_for(version) if t.wrapper}
    for spec in specs:
        state = out["states"][spec.id]
        if spec in absent:
            # its hook module was not imported (pending), or it was, and the engine found nothing to patch
            assert state["state"] == "pending" or (state["state"] == "native" and "nothing to patch" in state["reason"]), state
            assert set(out["patched"][spec.id].values()) <= {"upstream", "missing"}, out["patched"][spec.id]
        elif spec in tested:
            assert state["state"] in ("applied", "native"), state
            if state["state"] == "applied":
                wrapped = {t.key for t in spec.targets_for(version) if t.wrapper}
                # a target this patch only fingerprints may be one that another applied patch wraps
                shared = {t.key for t in spec.targets_for(version) if not t.wrapper} & ours
                assert {k for k, v in out["patched"][spec.id].items() if v == "vlpatch"} == wrapped | shared
        else:
            assert state["state"] == "skipped", state
            theirs = {k: v for k, v in out["patched"][spec.id].items() if k not in ours}
            assert set(theirs.values()) <= {"upstream", "missing"}, out["patched"][spec.id]
        assert set(out["reverted"][spec.id].values()) <= {"upstream", "missing"}
    if not tested:  # refused: one warning per patch meant for it (the others name their sibling), with the version
        lines = stderr.splitlines()
        meant = [s.id for s in specs if "covers it" not in out["states"][s.id]["reason"] and s not in absent]
        assert meant or absent, out["states"]
        for patch_id in meant:
            warned = [x for x in lines if f"patch {patch_id} not applied" in x and version in x]
            assert len(warned) == 1, stderr[-3000:]

def test_next_release_is_refused_until_the_matrix_lists_it(upstream, probed, next_releases):
    """Stand-in for the next upstream release: the installed one, removed from a copy of the matrix
    (its `tested` entry and fingerprints). vlpatch must refuse it, not patch it blindly."""
    if upstream is None:
        pytest.skip("no upstream of the matrix is installed here")
    dist, version = upstream
    path, touched_by = next_releases
    touched = touched_by.get(dist)
    if not touched:
        pytest.skip(f"{dist} {version} is not in the matrix: the test above covers its refusal")
    out, stderr = probed(path)
    for patch_id in touched:
        state = out["states"][patch_id]
        assert state["state"] == "skipped" and "not tested" in state["reason"] and version in state["reason"], state
        assert set(out["patched"][patch_id].values()) <= {"upstream", "missing"}, out["patched"][patch_id]
        assert sum(patch_id in line and "not applied" in line for line in stderr.splitlines()) == 1, stderr[-3000:]
