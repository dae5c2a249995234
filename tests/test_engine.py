"""The patching engine on a small synthetic upstream package (its own distribution, version and matrix).

Each scenario runs in a fresh interpreter so that imports, hooks and environment start clean.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

UPSTREAM = '''
def target(x):
    return x + 1


class Box:
    def method(self, x):
        return x * 10


class SubBox(Box):
    pass
'''

INTEGRATION = '''
def _double(wrapped, instance, args, kwargs):
    return 2 * wrapped(*args, **kwargs)


def wrappers(spec, version):
    return {"double": _double}
'''


def _fingerprint(src_dir, symbol):
    code = (
        "import importlib, wrapt, vlpatch.engine as e; m = importlib.import_module('fakeup');"
        f"print(e.fingerprint(wrapt.resolve_path(m, {symbol!r})[2]))"
    )
    return subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(src_dir)}, capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.fixture
def upstream(tmp_path):
    """fakeup 1.0 with a matrix entry that applies to >=1.0,<2 and knows 1.0's fingerprints."""

    def make(version="1.0", source=UPSTREAM, targets=("target", "Box.method"), applies=">=1.0,<2", native=None):
        (tmp_path / "fakeup").mkdir(exist_ok=True)
        (tmp_path / "fakeup" / "__init__.py").write_text(source)
        (tmp_path / "fakeint.py").write_text(INTEGRATION)
        info = tmp_path / f"fakeup-{version}.dist-info"
        info.mkdir(exist_ok=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fakeup\nVersion: {version}\n")
        (tmp_path / "orig" / "fakeup").mkdir(parents=True, exist_ok=True)  # the source 1.0 was tested with
        (tmp_path / "orig" / "fakeup" / "__init__.py").write_text(UPSTREAM)
        fps = {f"fakeup:{sym}": _fingerprint(tmp_path / "orig", sym) for sym in ("target", "Box.method")}
        matrix = {
            "schema": 1,
            "patches": [
                {
                    "id": "fake.double",
                    "distribution": "fakeup",
                    "applies": applies,
                    "tested": ["1.0"],
                    "native": native,
                    "hook": "fakeup",
                    "integration": "fakeint",
                    "targets": [{"module": "fakeup", "symbol": s, "wrapper": "double"} for s in targets],
                    "fingerprints": {"1.0": fps},
                }
            ],
        }
        (tmp_path / "matrix.yaml").write_text(json.dumps(matrix))
        return tmp_path

    return make


def run(tmp_path, code, **env):
    full_env = {**os.environ, "PYTHONPATH": str(tmp_path), "VLPATCH_MATRIX": str(tmp_path / "matrix.yaml"), **env}
    full_env.pop("VLPATCH", None)
    full_env.update(env)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_apply_before_import_is_idempotent_and_reversible(upstream):
    d = upstream()
    run(
        d,
        """
        import sys, vlpatch
        vlpatch.apply(); vlpatch.apply()
        assert "fakeup" not in sys.modules
        assert vlpatch.status()[0]["state"] == "pending"
        import fakeup
        orig_target = fakeup.target.__wrapped__
        assert fakeup.target(1) == 4, "patched once, not twice"
        assert fakeup.Box().method(1) == 20 and fakeup.SubBox().method(1) == 20
        assert vlpatch.status()[0]["state"] == "applied"
        vlpatch.apply()
        assert fakeup.target(1) == 4
        vlpatch.revert()
        assert fakeup.target is orig_target and fakeup.target(1) == 2
        assert fakeup.Box().method(1) == 10
        assert vlpatch.status()[0]["state"] == "reverted"
        vlpatch.apply()
        assert fakeup.target(1) == 4, "apply after revert patches the imported module at once"
        """,
    )



def test_patches_sharing_a_hook_module_all_attach_on_import(upstream):
    # several patches of one upstream (one per era) share the hook module: on import each is decided,
    # not only the first one listed (the one for older releases used to stay pending forever)
    d = upstream()
    matrix = json.loads((d / "matrix.yaml").read_text())
    older = {**matrix["patches"][0], "id": "fake.older", "applies": "<1.0", "tested": [], "fingerprints": {}}
    matrix["patches"].insert(0, older)
    (d / "matrix.yaml").write_text(json.dumps(matrix))
    run(
        d,
        """
        import vlpatch
        vlpatch.apply()
        import fakeup
        states = {row["id"]: row for row in vlpatch.status()}
        assert states["fake.double"]["state"] == "applied", states
        assert states["fake.older"]["state"] == "skipped" and "fake.double covers it" in states["fake.older"]["reason"], states
        assert fakeup.target(1) == 4
        """,
    )


def test_a_target_with_its_own_range_is_ignored_outside_it(upstream):
    # a class upstream added in a later release: part of the patch only where it exists
    d = upstream()
    matrix = json.loads((d / "matrix.yaml").read_text())
    matrix["patches"][0]["targets"].append({"module": "fakeup", "symbol": "Later.method", "wrapper": "double", "applies": ">=1.1"})
    (d / "matrix.yaml").write_text(json.dumps(matrix))
    run(d, "import fakeup, vlpatch; vlpatch.apply(); assert fakeup.target(1) == 4; assert vlpatch.status()[0]['state'] == 'applied'")

def test_apply_after_import(upstream):
    run(upstream(), "import fakeup, vlpatch; vlpatch.apply(); assert fakeup.target(1) == 4")


def test_unknown_version_is_refused_with_one_warning_and_force_overrides(upstream):
    d = upstream(version="2.0")
    proc = run(
        d,
        """
        import fakeup, vlpatch
        vlpatch.apply()
        assert fakeup.target(1) == 2, "untouched"
        st = vlpatch.status()[0]
        assert st["state"] == "skipped" and "2.0" in st["reason"] and "outside" in st["reason"], st
        """,
    )
    assert proc.stderr.count("not applied") == 1, proc.stderr
    run(d, "import fakeup, vlpatch; vlpatch.apply(force=True); assert fakeup.target(1) == 4")
    run(d, "import fakeup, vlpatch; vlpatch.apply(); assert fakeup.target(1) == 4", VLPATCH_FORCE="1")


def test_drifted_source_is_refused_and_left_untouched(upstream):
    d = upstream(source=UPSTREAM.replace("return x + 1", "return x + 100"))
    run(
        d,
        """
        import fakeup, vlpatch
        vlpatch.apply()
        assert fakeup.target(1) == 101 and fakeup.Box().method(1) == 10
        st = vlpatch.status()[0]
        assert st["state"] == "skipped" and "changed" in st["reason"] and "fakeup:target" in st["reason"], st
        """,
    )


def test_missing_target_means_nothing_is_wrapped(upstream):
    d = upstream(targets=("Box.method", "gone"))
    run(
        d,
        """
        import fakeup, vlpatch
        vlpatch.apply()
        assert fakeup.Box().method(1) == 10, "never half-applied"
        assert vlpatch.status()[0]["state"] == "skipped"
        """,
    )


def test_native_versions_stand_aside(upstream):
    d = upstream(native=">=1.0")
    run(d, "import fakeup, vlpatch; vlpatch.apply(); assert fakeup.target(1) == 2; assert vlpatch.status()[0]['state'] == 'native'")


def test_exclude_by_id(upstream):
    d = upstream()
    run(d, "import fakeup, vlpatch; vlpatch.apply(); assert fakeup.target(1) == 2", VLPATCH_EXCLUDE="fake.double")
    run(d, "import fakeup, vlpatch; vlpatch.apply(); assert fakeup.target(1) == 2", VLPATCH_PATCHES="other.patch")


def test_unknown_policy_fails_at_apply():
    proc = subprocess.run(
        [sys.executable, "-c", "import vlpatch; vlpatch.apply(policy='nope')"], capture_output=True, text=True
    )
    assert proc.returncode != 0 and "unknown policy 'nope'" in proc.stderr


def test_import_and_apply_import_nothing_heavy():
    code = (
        "import sys, vlpatch; vlpatch.apply(); vlpatch.status();"
        "heavy = [m for m in ('torch', 'transformers', 'llamafactory', 'unsloth', 'unsloth_zoo', 'datasets') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_env_autoenable_through_the_pth_file():
    probe = "import sys; print('vlpatch' in sys.modules, 'vlpatch._bootstrap' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "VLPATCH"}
    off = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert off.stdout.split() == ["False", "False"], "nothing is imported unless VLPATCH is set"
    on = subprocess.run([sys.executable, "-c", probe], env={**env, "VLPATCH": "1"}, capture_output=True, text=True, check=True)
    assert on.stdout.split() == ["True", "True"], on.stderr
