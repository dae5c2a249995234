"""compat_matrix.yaml and its generated lock agree: every tested version is in the lock (its fingerprints)
and has one smoke session (sessions.yaml; scripts/sessions.py runs them), every session is a tested version
or a release the matrix must refuse, and every code shape of the lock has one tested representative."""

import os

import yaml
from packaging.version import Version

import vlpatch.matrix as vmatrix

SESSIONS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sessions.yaml")


def raw():
    """sessions.yaml (the test sessions: repository data, not in the wheel)."""
    with open(SESSIONS, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def test_every_tested_version_has_fingerprints_and_one_session():
    data, m = raw(), vmatrix.load()
    sessions = data["smoke"]["sessions"]
    tested = {(p.distribution, v) for p in m.patches for v in p.tested}
    for p in m.patches:
        for v in p.tested:
            assert v in p.fingerprints, f"{p.id}: tested {v} has no fingerprints"
            assert set(p.fingerprints[v]) == {t.key for t in p.targets_for(v)}, f"{p.id} {v}: fingerprints do not match the targets"
            assert Version(v) in p.applies, f"{p.id}: tested {v} is outside its own range {p.applies}"
    smoked = [(s["distribution"], str(s["version"])) for s in sessions if s.get("expect") != "refused"]
    assert sorted(smoked) == sorted(tested), "sessions and tested versions differ"
    names = [f"{s['distribution']}-{s['version']}" for s in sessions]
    assert len(set(names)) == len(names), "two sessions share a name (and a nox environment)"
    assert sum(bool(s.get("demo")) for s in sessions) == 1
    for s in sessions:
        assert s["suite"] in data["smoke"]["suites"], s
        if s.get("expect") == "refused":
            v = Version(str(s["version"]))
            assert not any(v in p.applies for p in m.patches if p.distribution == s["distribution"]), s


def test_every_test_a_suite_names_exists():
    """The suites name test files and node ids (`file::test`) and may set test settings (`env`): each must
    exist, or the older releases' sessions and the canary stop on pytest's 'not found' (or vlpatch's
    settings check) after their setup, far from the rename that caused it."""
    import os
    import re

    from vlpatch.settings import SETTINGS

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name, suite in raw()["smoke"]["suites"].items():
        for arg in suite["args"]:
            if not arg.startswith("tests"):
                continue
            path, _, test = arg.partition("::")
            assert os.path.exists(os.path.join(root, path)), f"suite {name}: no {path}"
            if test:
                text = open(os.path.join(root, path), encoding="utf-8").read()
                assert re.search(rf"^def {re.escape(test)}\(", text, re.M), f"suite {name}: no test {test} in {path}"
        unknown = set(suite.get("env", {})) - set(SETTINGS)
        assert not unknown, f"suite {name}: env sets {unknown}, which vlpatch's settings check refuses"


def test_the_start_up_index_equals_the_full_parse():
    # apply() reads the shipped matrix's lines for (id, distribution, hook); the hooks parse it whole
    full = [(p.id, p.distribution, p.hook) for p in vmatrix.load(vmatrix.MATRIX_PATH).patches]
    assert [tuple(e) for e in vmatrix.index(vmatrix.MATRIX_PATH)] == full and len(full) >= 6


def test_readme_coverage_table_is_the_matrix(capsys):
    """The README's plugin coverage table is `vlpatch coverage`'s output, generated from the matrix."""
    import os

    from vlpatch.cli import main

    assert main(["coverage"]) == 0
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    assert capsys.readouterr().out.strip() in readme, "regenerate the table with `vlpatch coverage`"


# Code shapes the lock knows that no session tests yet: a release with one of them stops a protected
# process at its trainer's import (it is refused, never patched blindly). Adding a session for one takes it
# off this list (the test below fails until then); a new shape in the lock fails it too.
SHAPES_NOT_YET_TESTED: set = set()


def lock():
    import json

    with open(vmatrix.lock_path(vmatrix.MATRIX_PATH), encoding="utf-8") as fh:
        return json.load(fh)


def test_the_lock_is_of_this_matrix():
    """compat_lock.json is generated from the matrix (scripts/lock.py): the same patches, ranges and targets."""
    data, m = lock(), vmatrix.load(vmatrix.MATRIX_PATH)
    assert set(data["patches"]) == {p.id for p in m.patches}, "run `python scripts/lock.py`"
    for p in m.patches:
        entry = data["patches"][p.id]
        assert entry["distribution"] == p.distribution and entry["applies"] == str(p.applies), f"{p.id}: run `python scripts/lock.py`"
        seen = set()
        for shape in p.shapes:
            assert shape.name == shape.releases[0] and not seen & set(shape.releases), shape
            seen |= set(shape.releases)
            assert set(shape.fingerprints) == {t.key for t in p.targets_for(shape.name)}, f"{p.id} {shape.name}: run `python scripts/lock.py`"
            assert all(shape.fingerprints.values()), f"{p.id} {shape.name}: a target is missing from that release's wheel"
            assert all(Version(v) in p.applies and not (p.absent and Version(v) in p.absent) for v in shape.releases)


def test_every_shape_has_one_tested_representative():
    """Protection follows the code: every code shape of a patch's range is tested by one session (a release
    whose code equals a tested release's is protected by it), and no two tested releases share a shape."""
    m = vmatrix.load(vmatrix.MATRIX_PATH)
    untested = set()
    for p in m.patches:
        for v in p.tested:
            assert p.shape_of(v) is not None, f"{p.id}: tested {v} is not in the lock (run `python scripts/lock.py`)"
        for shape in p.shapes:
            reps = [v for v in p.tested if v in shape.releases]
            assert len(reps) <= 1, f"{p.id}: {reps} share one code shape: one session tests it"
            if not reps:
                untested.add((p.id, shape.name))
    assert untested == SHAPES_NOT_YET_TESTED, "shapes without a session changed: " + repr(sorted(untested ^ SHAPES_NOT_YET_TESTED))


def test_readme_release_table_is_the_lock(capsys):
    """The README's protected-release table is `vlpatch releases`' output, generated from the matrix and its lock."""
    import os

    from vlpatch.cli import main

    assert main(["releases"]) == 0
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    assert capsys.readouterr().out.strip() in readme, "regenerate the table with `vlpatch releases`"


def test_the_shipped_matrix_is_patches_and_processors_only():
    """The wheel's matrix holds what vlpatch reads (patches, the processors' media layouts, the lock's
    name); the test sessions live in sessions.yaml, in the repository. A YAML alias never ties one
    trainer's patch to another's data: trainers share processor layouts through `processors:`, by name."""
    import re

    with open(vmatrix.MATRIX_PATH, encoding="utf-8") as fh:
        text = fh.read()
    assert set(yaml.safe_load(text)) == {"schema", "lock", "patches", "processors"}
    owner, anchors, aliases = None, {}, []
    distribution = {}
    for line in text.splitlines():
        code = line.split(" #", 1)[0]
        if line.startswith("  - id:"):
            owner = line.split(":", 1)[1].strip()
        elif not line.startswith(" ") and line.strip() and not line.startswith("#"):
            owner = None if not line.startswith("patches:") else owner
        m = re.match(r"\s+distribution:\s*(\S+)", code)
        if m and owner:
            distribution[owner] = m.group(1)
        anchors.update({a: owner for a in re.findall(r"&([\w-]+)", code)})
        aliases.extend((a, owner) for a in re.findall(r"\*([\w-]+)", code))
    for alias, user in aliases:
        assert distribution.get(anchors[alias]) == distribution.get(user), f"{user} uses *{alias} of {anchors[alias]}"
    layouts = yaml.safe_load(text)["processors"]
    for p in vmatrix.load(vmatrix.MATRIX_PATH).patches:
        for name in p.options.get("processors", []):
            assert "media_tokens" in layouts[name], f"{p.id}: {name} has no media_tokens"
