"""compat_matrix.yaml is the single source of truth: every tested version has fingerprints and one
smoke session (scripts/sessions.py runs them), and every session is a tested version or a release
the matrix must refuse."""

import yaml
from packaging.version import Version

import vlpatch.matrix as vmatrix


def raw():
    with open(vmatrix.MATRIX_PATH, encoding="utf-8") as fh:
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


def test_readme_coverage_table_is_the_matrix():
    """The README's plugin coverage table is `vlpatch coverage`'s output, generated from the matrix."""
    import os

    from vlpatch.cli import coverage_markdown

    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    assert coverage_markdown() in readme, "regenerate the table with `vlpatch coverage`"
