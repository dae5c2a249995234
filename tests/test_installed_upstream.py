"""What vlpatch does with the upstream release installed in this environment, on its real code.

Runs in every smoke session (scripts/sessions.py), including the ones that hold a release the
matrix does not cover (`expect: refused`) and the canary's newest releases:
* a tested release: its patch attaches (every wrapped target is vlpatch's), revert() puts back the
  very same objects;
* a release with code no tested release has (or the installed one, no longer tested in a copy of the
  matrix, to stand for the next upstream release): every patch of it is refused, the trainer module's
  import stops naming the release and the ways on, and every target is upstream's own object;
* the installed release with its tested entry renamed in a copy of the matrix: protected because its
  code equals a tested release's, whatever its version number.
Each check runs in a process of its own so that nothing else in the test process is patched: one
interpreter imports what every trainer imports first (torch, transformers' Trainer, datasets), never
vlpatch or a trainer module, and each check is a fork of it that applies vlpatch and imports the trainer
modules of every upstream installed here at once (as a user's training process imports them): the
shipped matrix, then the stand-ins of their next releases; each test reads its upstream's part.
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
from tests.fixtures import matrix_copy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPECT = os.environ.get("VLPATCH_EXPECT", "")
STRICT = {m.strip() for m in os.environ.get("VLPATCH_STRICT", "").split(",") if m.strip()}

PROBE = r"""
import importlib, json, os, sys, traceback
sys.path.insert(0, sys.argv[1])
out_dir, runs, dists = sys.argv[2], json.loads(sys.argv[3]), sys.argv[4:]
# what every trainer imports first, paid once: each run below is a fork of this interpreter, which has
# imported neither vlpatch nor any trainer module (the hook modules are imported after apply(), in the run)
for heavy in ("torch", "transformers", "transformers.trainer", "datasets", "accelerate"):
    try:
        importlib.import_module(heavy)
    except Exception:
        pass


def run():
    import vlpatch, wrapt
    from vlpatch import _wrap, matrix
    vlpatch.apply()
    specs = [s for s in matrix.load().patches if s.distribution in dists]
    from importlib.metadata import version as _version
    from packaging.version import Version
    installed = {d: Version(_version(d)) for d in dists}
    # a hook module of patches that have nothing to patch in this release (`absent`) is not imported: it may
    # not import alone there (TRL 0.24.0's dpo_trainer under transformers 5.6 in a fresh interpreter)
    needed = {s.hook for s in specs if s.absent is None or installed[s.distribution] not in s.absent}
    assert not needed & set(sys.modules), sorted(needed & set(sys.modules))  # no hook module imported before apply()
    stopped = {}  # hook -> the UnknownUpstreamError its import raised (code no tested release has)
    for hook in sorted(needed):
        try:
            if hook.startswith("unsloth_zoo"):
                from tests.fixtures.unsloth_import import import_vision_utils  # the CPU recipe
                import_vision_utils()
            else:
                importlib.import_module(hook)
        except vlpatch.UnknownUpstreamError as exc:
            stopped[hook] = str(exc)
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
    return {"states": states, "patched": before, "reverted": after, "stopped": stopped}


for i, matrix_path in enumerate(runs):  # one at a time, each in a fresh fork
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.dup2(os.open(os.path.join(out_dir, f"{i}.err"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
            if matrix_path:
                os.environ["VLPATCH_MATRIX"] = matrix_path
            result = run()
            with open(os.path.join(out_dir, f"{i}.json"), "w") as fh:
                json.dump(result, fh)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
    os.waitpid(pid, 0)
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


def probe(dists: list, matrix_paths: list, out_dir: str) -> dict:
    """{matrix path or None: (probe output, its stderr)}: one interpreter imports what every trainer imports
    first, then each matrix gets a fork of it that applies vlpatch and imports the trainer modules (three
    fresh interpreters cost 3 x 11 s of imports for TRL; this costs 11 s and 2 s a fork)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLPATCH")}
    proc = subprocess.run([sys.executable, "-c", PROBE, ROOT, out_dir, json.dumps(matrix_paths), *dists], env=env,
                          capture_output=True, text=True, timeout=600)
    found = {}
    for i, path in enumerate(matrix_paths):
        with open(os.path.join(out_dir, f"{i}.err"), encoding="utf-8", errors="replace") as fh:
            stderr = fh.read()
        result = os.path.join(out_dir, f"{i}.json")
        assert os.path.exists(result), (stderr or proc.stderr)[-3000:]
        with open(result, encoding="utf-8") as fh:
            found[path] = (json.load(fh), stderr)
    return found


@pytest.fixture(scope="module")
def next_releases(tmp_path_factory) -> dict:
    """Stand-ins for every installed upstream's next release, on its real code: {"untested": a copy of the
    matrix where the installed release is no longer tested (a known code shape no tested release has),
    "vouched": one where its tested entry is renamed (`VERSION.post99`, same code)}: (path, {distribution:
    the patch ids touched})."""
    versions = dict(installed())
    return {how: getattr(matrix_copy, how)(tmp_path_factory.mktemp(how), versions) for how in ("untested", "vouched")}


@pytest.fixture(scope="module")
def probed(next_releases, tmp_path_factory):
    """(probe output, stderr) by matrix path (None: the shipped matrix; the stand-ins' copies), for every
    installed upstream at once, all probed on first use."""
    cache: dict = {}

    def get(matrix_path: str | None = None) -> tuple:
        if not cache:
            paths = [None, *(path for path, _ in next_releases.values())]
            cache.update(probe([d for d, _ in installed()], paths, str(tmp_path_factory.mktemp("probe"))))
        return cache[matrix_path]

    return get


def protected(spec, version: str, state: dict) -> bool:
    """The lock says a tested release has this release's code; for a release newer than the lock (the
    canary's), the engine's comparison of the installed code with the tested releases' decides."""
    shape = spec.shape_of(version)
    if version in spec.tested or (shape is not None and any(v in spec.tested for v in shape.releases)):
        return True
    return shape is None and "code identical to tested" in state.get("reason", "")


def pytest_generate_tests(metafunc):
    if "upstream" in metafunc.fixturenames:
        found = installed()
        metafunc.parametrize("upstream", found or [None], ids=[f"{d}-{v}" for d, v in found] or ["none"])


def test_installed_release_is_patched_or_refused(upstream, probed):
    if upstream is None:
        pytest.skip("no upstream of the matrix is installed here")
    dist, version = upstream
    specs = [s for s in vmatrix.load().patches if s.distribution == dist]
    out, stderr = probed()
    tested = [s for s in specs if protected(s, version, out["states"][s.id])]
    # releases without the code a patch is for (`absent`: TRL before its vision collators): nothing to patch
    absent = [s for s in specs if s.absent is not None and Version(version) in s.absent]
    if not STRICT or dist in STRICT:  # the session's own upstream: its `expect` must agree with the matrix
        assert bool(tested) != (EXPECT == "refused"), f"{dist} {version}: the session's `expect` disagrees with the matrix"
    # another upstream installed beside it (TRL under LLaMA-Factory and unsloth_zoo): the matrix alone decides
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
            assert spec.hook not in out["stopped"], out["stopped"]
            if state["state"] == "applied":
                assert state["reason"] == f"tested on {version}" or f"code identical to tested" in state["reason"], state
                wrapped = {t.key for t in spec.targets_for(version) if t.wrapper}
                # a target this patch only fingerprints may be one that another applied patch wraps
                shared = {t.key for t in spec.targets_for(version) if not t.wrapper} & ours
                assert {k for k, v in out["patched"][spec.id].items() if v == "vlpatch"} == wrapped | shared
        elif "covers it" in state["reason"]:
            assert state["state"] == "skipped", state
        elif spec.optional:  # a speed-up: skipped, or never reached where the trainer's import stopped first
            assert state["state"] == "skipped" or (state["state"] == "pending" and out["stopped"]), state
        else:  # code no tested release has: refused, and its trainer module's import stopped, naming the release
            assert state["state"] == "refused" and version in state["reason"], state
            assert version in out["stopped"][spec.hook] and f"VLPATCH_EXCLUDE={spec.id}" in out["stopped"][spec.hook], out["stopped"]
        if state["state"] != "applied":
            theirs = {k: v for k, v in out["patched"][spec.id].items() if k not in ours}
            assert set(theirs.values()) <= {"upstream", "missing"}, out["patched"][spec.id]
        assert set(out["reverted"][spec.id].values()) <= {"upstream", "missing"}
    if not tested:  # refused: each patch meant for it stops its trainer's import (the others name their sibling)
        meant = [s.id for s in specs if "covers it" not in out["states"][s.id]["reason"] and s not in absent and not s.optional]
        assert meant or absent, out["states"]
        for patch_id in meant:
            assert sum(f"patch {patch_id} refused" in line for line in stderr.splitlines()) == 1, stderr[-3000:]


def stand_in(upstream, probed, next_releases, how: str) -> tuple:
    """(upstream, matrix path, patch ids touched, probe output) of one stand-in for the next release."""
    if upstream is None:
        pytest.skip("no upstream of the matrix is installed here")
    path, touched_by = next_releases[how]
    touched = touched_by.get(upstream[0])
    if not touched:
        pytest.skip(f"{upstream[0]} {upstream[1]} is not tested in the matrix: the test above covers it")
    return upstream, path, touched, probed(path)


def test_next_release_with_untested_code_stops_its_import(upstream, probed, next_releases):
    """Stand-in for the next upstream release whose code no tested release has: the installed one, no
    longer tested in a copy of the matrix. A process that asked for protection stops at the trainer's
    import, naming the release and the ways on; nothing is patched blindly."""
    (dist, version), path, touched, (out, stderr) = stand_in(upstream, probed, next_releases, "untested")
    for patch_id in touched:
        spec = vmatrix.load(path).by_id(patch_id)
        state = out["states"][patch_id]
        assert set(out["patched"][patch_id].values()) <= {"upstream", "missing"}, out["patched"][patch_id]
        if spec.optional:
            assert state["state"] == "skipped" and version in state["reason"], state
            continue
        assert state["state"] == "refused" and "is known but no tested release has it" in state["reason"] and version in state["reason"], state
        message = out["stopped"][spec.hook]
        for way in ("upgrade vlpatch", "VLPATCH_FORCE=1", f"VLPATCH_EXCLUDE="):
            assert way in message, message
        assert sum(f"patch {patch_id} refused" in line for line in stderr.splitlines()) == 1, stderr[-3000:]


def test_next_release_with_tested_code_is_protected(upstream, probed, next_releases):
    """Stand-in for the next upstream release with the code of a tested one: the installed release's tested
    entry renamed in a copy of the matrix. It attaches, and says which tested release vouches for it."""
    (dist, version), path, touched, (out, _) = stand_in(upstream, probed, next_releases, "vouched")
    assert not out["stopped"], out["stopped"]
    for patch_id in touched:
        state = out["states"][patch_id]
        if state["state"] == "native":
            continue
        assert state["state"] == "applied" and state["reason"] == f"{version}: code identical to tested {version}.post99", state
        assert "vlpatch" in out["patched"][patch_id].values(), out["patched"][patch_id]
