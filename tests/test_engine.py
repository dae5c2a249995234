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
        lock = {"patches": {"fake.double": {"distribution": "fakeup", "shapes": [{"name": "1.0", "releases": ["1.0"], "fingerprints": fps}]}}}
        (tmp_path / "lock.json").write_text(json.dumps(lock))
        matrix = {
            "schema": 1,
            "lock": "lock.json",
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
    older = {**matrix["patches"][0], "id": "fake.older", "applies": "<1.0", "tested": []}
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


STOPS = """
import vlpatch
vlpatch.apply()
try:
    import fakeup
except vlpatch.UnknownUpstreamError as exc:
    print("STOPPED", exc)
else:
    raise SystemExit("imported: would train unprotected")
import sys
assert "fakeup" not in sys.modules, "the failed import left no half-imported module"
st = vlpatch.status()[0]
assert st["state"] == "refused", st
print("REASON", st["reason"])
"""


def test_a_release_with_tested_code_is_protected_whatever_its_version(upstream):
    # 1.3 is in no `tested` list, but its targets' source equals 1.0's: the same code, by construction
    d = upstream(version="1.3")
    run(
        d,
        """
        import fakeup, vlpatch
        vlpatch.apply()
        assert fakeup.target(1) == 4
        st = vlpatch.status()[0]
        assert st["state"] == "applied" and st["reason"] == "1.3: code identical to tested 1.0", st
        assert st["vouched_by"] == "1.0", st
        """,
    )


def test_a_release_outside_every_range_stops_the_import_and_force_overrides(upstream):
    d = upstream(version="2.0")
    proc = run(d, STOPS)
    assert "fakeup 2.0 is outside every range" in proc.stdout, proc.stdout
    for way in ("upgrade vlpatch", "VLPATCH_FORCE=1", "VLPATCH_EXCLUDE=fake.double"):
        assert way in proc.stdout, proc.stdout
    run(d, "import fakeup, vlpatch; vlpatch.apply(force=True); assert fakeup.target(1) == 4")
    run(d, "import fakeup, vlpatch; vlpatch.apply(); assert fakeup.target(1) == 4", VLPATCH_FORCE="1")
    forced = run(d, "import vlpatch; vlpatch.apply(force=True); import fakeup; print(vlpatch.status()[0]['reason'])")
    assert forced.stdout.startswith("forced onto 2.0, outside its range"), forced.stdout



def test_code_no_tested_release_has_stops_the_import_naming_what_differs(upstream):
    d = upstream(version="1.4", source=UPSTREAM.replace("return x + 1", "return x + 100"))
    proc = run(d, STOPS)
    assert "fakeup 1.4: this vlpatch does not know that release" in proc.stdout, proc.stdout
    assert "differs from tested 1.0 in target" in proc.stdout and "Box.method" not in proc.stdout.split("REASON")[1], proc.stdout
    # the upstream module was never left patched, and a process that imports no trainer runs on
    run(d, "import vlpatch; vlpatch.apply(); import json; print('alive')")
    forced = run(d, "import vlpatch; vlpatch.apply(force=True); import fakeup; print(vlpatch.status()[0]['reason'])")
    assert forced.stdout.startswith("forced onto code no tested release has (nearest tested: 1.0)"), forced.stdout
    # excluded: the user knowingly trains unprotected
    run(d, "import fakeup, vlpatch; vlpatch.apply(); assert fakeup.target(1) == 101", VLPATCH_EXCLUDE="fake.double")


def test_vlpatch_1_stops_a_trainer_process_on_unknown_code_and_lets_others_run(upstream):
    # the auto-enable path (.pth at start-up), as `llamafactory-cli train` with VLPATCH=1 meets a new release
    d = upstream(version="1.6", source=UPSTREAM.replace("return x + 1", "return x + 100"))
    env = {**os.environ, "PYTHONPATH": str(d), "VLPATCH_MATRIX": str(d / "matrix.yaml"), "VLPATCH": "1"}
    env.pop("VLPATCH_EXCLUDE", None)
    other = subprocess.run([sys.executable, "-c", "print('alive')"], env=env, capture_output=True, text=True)
    assert other.returncode == 0 and other.stdout.strip() == "alive" and not other.stderr, other.stderr
    trainer = subprocess.run([sys.executable, "-c", "import fakeup; print('processed data unprotected')"], env=env, capture_output=True, text=True)
    assert trainer.returncode != 0 and "processed data unprotected" not in trainer.stdout, trainer.stdout
    assert "vlpatch.errors.UnknownUpstreamError" in trainer.stderr and "fakeup 1.6" in trainer.stderr, trainer.stderr
    assert "VLPATCH_EXCLUDE=fake.double" in trainer.stderr, trainer.stderr
    env["VLPATCH_EXCLUDE"] = "fake.double"
    unprotected = subprocess.run([sys.executable, "-c", "import fakeup; print(fakeup.target(1))"], env=env, capture_output=True, text=True)
    assert unprotected.returncode == 0 and unprotected.stdout.strip() == "101", unprotected.stderr


def test_a_known_but_untested_shape_says_so(upstream):
    d = upstream(version="1.5", source=UPSTREAM.replace("return x + 1", "return x + 100"))
    lock = json.loads((d / "lock.json").read_text())
    shapes = lock["patches"]["fake.double"]["shapes"]
    # the lock read 1.5's wheel: its own shape, which no tested release has
    fps = {**shapes[0]["fingerprints"], "fakeup:target": _fingerprint_of_source(d, UPSTREAM.replace("return x + 1", "return x + 100"))}
    shapes.append({"name": "1.5", "releases": ["1.5"], "fingerprints": fps})
    (d / "lock.json").write_text(json.dumps(lock))
    proc = run(d, STOPS)
    assert "its code shape (1.5 - 1.5) is known but no tested release has it" in proc.stdout, proc.stdout


def _fingerprint_of_source(d, source):
    (d / "other" / "fakeup").mkdir(parents=True, exist_ok=True)
    (d / "other" / "fakeup" / "__init__.py").write_text(source)
    return _fingerprint(d / "other", "target")


def test_apply_after_a_refused_trainer_was_imported_raises(upstream):
    d = upstream(source=UPSTREAM.replace("return x + 1", "return x + 100"))
    run(
        d,
        """
        import fakeup, vlpatch
        try:
            vlpatch.apply()
        except vlpatch.UnknownUpstreamError as exc:
            assert "fakeup 1.0: its installed code differs from that release's wheel" in str(exc), exc
        else:
            raise SystemExit("apply() returned: the imported trainer would run unprotected")
        assert fakeup.target(1) == 101 and fakeup.Box().method(1) == 10, "left untouched"
        """,
    )


def test_an_optional_patch_that_cannot_attach_warns_and_the_import_goes_on(upstream):
    d = upstream(source=UPSTREAM.replace("return x + 1", "return x + 100"))
    matrix = json.loads((d / "matrix.yaml").read_text())
    matrix["patches"][0]["optional"] = True
    (d / "matrix.yaml").write_text(json.dumps(matrix))
    proc = run(d, "import vlpatch; vlpatch.apply(); import fakeup; assert fakeup.target(1) == 101; assert vlpatch.status()[0]['state'] == 'skipped'")
    assert proc.stderr.count("patch fake.double not applied") == 1, proc.stderr


def test_missing_target_means_nothing_is_wrapped(upstream):
    d = upstream(targets=("Box.method", "gone"))
    proc = run(d, STOPS)
    assert "target missing in fakeup 1.0" in proc.stdout, proc.stdout
    # even forced, nothing is wrapped (a patch attaches all its targets or none), and the process stops
    run(
        d,
        """
        import fakeup, vlpatch
        try:
            vlpatch.apply(force=True)
        except vlpatch.UnknownUpstreamError:
            pass
        else:
            raise SystemExit("no stop")
        assert fakeup.Box().method(1) == 10 and vlpatch.status()[0]["state"] == "refused"
        """,
    )
    # what it would have wrapped is upstream's own: nothing half-applied
    run(d, "import fakeup, vlpatch; vlpatch.apply(exclude=['fake.double']); assert fakeup.Box().method(1) == 10")


def test_native_versions_stand_aside(upstream):
    d = upstream(native=">=1.0")
    run(d, "import fakeup, vlpatch; vlpatch.apply(); assert fakeup.target(1) == 2; assert vlpatch.status()[0]['state'] == 'native'")


def test_exclude_by_id(upstream):
    d = upstream()
    run(d, "import fakeup, vlpatch; vlpatch.apply(); assert fakeup.target(1) == 2", VLPATCH_EXCLUDE="fake.double")
    matrix = json.loads((d / "matrix.yaml").read_text())
    matrix["patches"].append({**matrix["patches"][0], "id": "other.patch", "applies": "<1.0", "tested": []})
    (d / "matrix.yaml").write_text(json.dumps(matrix))
    run(d, "import fakeup, vlpatch; vlpatch.apply(); assert fakeup.target(1) == 2", VLPATCH_PATCHES="other.patch")


def test_unknown_policy_fails_at_apply():
    proc = subprocess.run(
        [sys.executable, "-c", "import vlpatch; vlpatch.apply(policy='nope')"], capture_output=True, text=True
    )
    assert proc.returncode != 0 and "apply(policy=...)='nope' is not a policy (valid: drop, drop_media, error, shrink)" in proc.stderr


HEAVY = ("torch", "transformers", "llamafactory", "unsloth", "unsloth_zoo", "datasets", "trl")
# what the start-up path leaves for later (benchmarks/startup.py measures it): wrapt pulls in asyncio
STARTUP_DEFERRED = ("wrapt", "asyncio", "yaml", "packaging", "importlib.metadata", "logging", "inspect", "dataclasses")


@pytest.mark.parametrize("how", ["apply", "VLPATCH=1"])
def test_import_and_apply_import_nothing_heavy(how):
    code = (
        "import sys, vlpatch; vlpatch.apply(); vlpatch.status();"
        f"heavy = [m for m in {HEAVY + STARTUP_DEFERRED!r} if m in sys.modules];"
        "assert not heavy, heavy"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLPATCH")}
    if how == "VLPATCH=1":
        env["VLPATCH"], code = "1", code.replace("vlpatch.apply();", "assert 'vlpatch._bootstrap' in sys.modules;")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_env_autoenable_through_the_pth_file():
    probe = "import sys; print('vlpatch' in sys.modules, 'vlpatch._bootstrap' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "VLPATCH"}
    off = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert off.stdout.split() == ["False", "False"], "nothing is imported unless VLPATCH is set"
    on = subprocess.run([sys.executable, "-c", probe], env={**env, "VLPATCH": "1"}, capture_output=True, text=True, check=True)
    assert on.stdout.split() == ["True", "True"], on.stderr


# ----------------------------------------------------------------------------- settings (issue 16)

BAD_SETTINGS = [
    ({"VLPATCH_POLICY": "dropmedia"}, "", ["VLPATCH_POLICY='dropmedia'", "did you mean 'drop_media'"]),
    ({"VLPATCH_PATCHES": "fake.doubel"}, "", ["VLPATCH_PATCHES='fake.doubel'", "did you mean 'fake.double'"]),
    ({"VLPATCH_EXCLUDE": "fake.doubel"}, "", ["VLPATCH_EXCLUDE='fake.doubel'", "did you mean 'fake.double'"]),
    ({"VLPATCH_POLCY": "drop"}, "", ["VLPATCH_POLCY is not a vlpatch setting", "did you mean 'VLPATCH_POLICY'"]),
    ({"VLPATCH_FORCE": "maybe"}, "", ["VLPATCH_FORCE='maybe' is not a switch"]),
    ({"VLPATCH_MEDIA_FIRST": "ture"}, "", ["VLPATCH_MEDIA_FIRST='ture'", "did you mean 'true'"]),
    ({"VLPATCH_LOG_LEVEL": "LOUD"}, "", ["VLPATCH_LOG_LEVEL='LOUD' is not a log level"]),
    ({"VLPATCH_MATRIX": "/nowhere/matrix.yaml"}, "", ["VLPATCH_MATRIX='/nowhere/matrix.yaml': no such file"]),
    ({}, "policy='dropmedia'", ["apply(policy=...)='dropmedia'", "did you mean 'drop_media'"]),
    ({}, "patches=['fake.doubel']", ["apply(patches=...)='fake.doubel'", "did you mean 'fake.double'"]),
    ({}, "exclude='fake.doubel'", ["apply(exclude=...)='fake.doubel'"]),
    ({}, "force='yes'", ["apply(force=...): 'yes' is not True or False"]),
    ({"VLPATCH_MAX_BAD": "lots"}, "", ["VLPATCH_MAX_BAD='lots' is not a share between 0 and 1"]),
    ({"VLPATCH_MAX_BAD": "150%"}, "", ["VLPATCH_MAX_BAD='150%' is not a share between 0 and 1"]),
    ({}, "max_bad=2", ["apply(max_bad=...)=2 is not a share between 0 and 1"]),
    ({"VLPATCH_SHRINK_MIN_PIXELS": "big"}, "", ["VLPATCH_SHRINK_MIN_PIXELS='big' is not a pixel count"]),
    ({"VLPATCH_SHRINK_FALLBACK": "shrink"}, "", ["VLPATCH_SHRINK_FALLBACK='shrink' is not a fallback policy for shrink"]),
    ({"VLPATCH_SHRINK_FALLBACK": "drop_medai"}, "", ["did you mean 'drop_media'"]),
    ({}, "shrink_min_pixels=0", ["apply(shrink_min_pixels=...)=0 is not a pixel count"]),
    ({"VLPATCH_SHRINK_MIN_FRAMES": "few"}, "", ["VLPATCH_SHRINK_MIN_FRAMES='few' is not a frame count"]),
    ({}, "shrink_min_frames=0", ["apply(shrink_min_frames=...)=0 is not a frame count"]),
    ({}, "shrink_dir=fakeup.__file__", ["is a file, not a directory"]),
]


def test_shrink_settings_read_and_reach_workers(monkeypatch, tmp_path):
    import vlpatch
    from vlpatch import engine

    cfg = engine.Config.from_env({})
    assert (cfg.shrink_min_pixels, cfg.shrink_min_frames, cfg.shrink_fallback, cfg.shrink_dir) == (65536, 4, "drop", None), "the documented defaults"
    cfg = engine.Config.from_env({"VLPATCH_POLICY": "shrink", "VLPATCH_SHRINK_MIN_PIXELS": "128x128", "VLPATCH_SHRINK_FALLBACK": "drop_media",
                                  "VLPATCH_SHRINK_MIN_FRAMES": " 8 "})
    assert (cfg.policy, cfg.shrink_min_pixels, cfg.shrink_min_frames, cfg.shrink_fallback) == ("shrink", 16384, 8, "drop_media")
    try:
        vlpatch.apply(policy="shrink", shrink_min_pixels=4096, shrink_min_frames=2, shrink_fallback="error", shrink_dir=tmp_path, patches=[])
        assert engine.config().shrink_dir == str(tmp_path)
        assert (os.environ["VLPATCH_POLICY"], os.environ["VLPATCH_SHRINK_MIN_PIXELS"], os.environ["VLPATCH_SHRINK_MIN_FRAMES"],
                os.environ["VLPATCH_SHRINK_FALLBACK"], os.environ["VLPATCH_SHRINK_DIR"]) == ("shrink", "4096", "2", "error", str(tmp_path)), "spawned workers read them"
    finally:
        vlpatch.revert()
    assert "VLPATCH_SHRINK_DIR" not in os.environ


def test_max_bad_reads_a_share_and_reaches_workers(monkeypatch):
    import vlpatch
    from vlpatch import engine

    monkeypatch.setenv("VLPATCH_MAX_BAD", "10%")
    assert engine.Config.from_env().max_bad == 0.1
    monkeypatch.delenv("VLPATCH_MAX_BAD")
    assert engine.Config.from_env().max_bad == 0.05, "the documented default"
    try:
        vlpatch.apply(max_bad="0.5", patches=[])
        assert engine.config().max_bad == 0.5 and os.environ["VLPATCH_MAX_BAD"] == "0.5", "spawned workers read it"
    finally:
        vlpatch.revert()
    assert "VLPATCH_MAX_BAD" not in os.environ


@pytest.mark.parametrize("env,args,expected", BAD_SETTINGS)
def test_a_bad_setting_raises_at_apply_naming_it(upstream, env, args, expected):
    d = upstream()
    proc = run(
        d,
        f"""
        import fakeup, vlpatch
        from vlpatch.settings import SettingsError
        try:
            vlpatch.apply({args})
        except SettingsError as exc:
            print(exc)
        else:
            raise SystemExit("no error")
        assert fakeup.target(1) == 2, "nothing patched"
        """,
        **env,
    )
    for text in expected:
        assert text in proc.stdout, proc.stdout


@pytest.mark.parametrize("env", [{"VLPATCH_POLICY": "dropmedia"}, {"VLPATCH_PATCHES": "fake.doubel"}, {"VLPATCH": "ture"}])
def test_vlpatch_1_with_a_bad_setting_stops_at_the_trainer_import_only(upstream, env):
    d = upstream()
    name = next(iter(env))
    base = {**os.environ, "PYTHONPATH": str(d), "VLPATCH_MATRIX": str(d / "matrix.yaml"), "VLPATCH": "1", **env}
    # a process that imports no trainer keeps running (pip, an editor, a linter): one warning
    other = subprocess.run([sys.executable, "-c", "print('alive')"], env=base, capture_output=True, text=True)
    assert other.returncode == 0 and other.stdout.strip() == "alive", other.stderr
    assert name in other.stderr and "stops if it imports fakeup" in other.stderr, other.stderr
    # one that imports the patched upstream stops there, naming the setting; nothing ran unprotected
    trainer = subprocess.run([sys.executable, "-c", "import fakeup; print('trained unprotected')"], env=base, capture_output=True, text=True)
    assert trainer.returncode != 0 and "trained unprotected" not in trainer.stdout, trainer.stdout
    error = trainer.stderr[trainer.stderr.index("vlpatch.settings.SettingsError"):]
    assert name in error and "stops at `import fakeup` rather than run unprotected" in error, trainer.stderr
    # fixing the setting in the process and calling apply() lifts the refusal
    fixed = subprocess.run(
        [sys.executable, "-c", "import os, vlpatch; [os.environ.pop(k) for k in list(os.environ) if k.startswith('VLPATCH_') and k != 'VLPATCH_MATRIX']; "
         "os.environ['VLPATCH']='1'; vlpatch.apply(); import fakeup; assert fakeup.target(1) == 4"],
        env=base, capture_output=True, text=True,
    )
    assert fixed.returncode == 0, fixed.stderr


def test_a_later_apply_takes_effect(upstream):
    d = upstream()
    run(
        d,
        """
        import os, fakeup, vlpatch
        from vlpatch import engine
        vlpatch.apply()
        assert fakeup.target(1) == 4
        vlpatch.apply(exclude=["fake.double"])
        assert fakeup.target(1) == 2 and fakeup.Box().method(1) == 10, "excluded now: reverted"
        st = vlpatch.status()[0]
        assert st["state"] == "excluded" and st["reason"] == "excluded by you (apply(exclude=...))", st
        vlpatch.apply(patches=[])
        assert fakeup.target(1) == 2 and "not in apply(patches=...)" in vlpatch.status()[0]["reason"]
        vlpatch.apply()
        assert fakeup.target(1) == 4 and vlpatch.status()[0]["state"] == "applied", "selected again: attached"
        vlpatch.apply(policy="error", media_first=True)
        assert engine.config().policy == "error" and os.environ["VLPATCH_POLICY"] == "error"
        assert engine.config().media_first and os.environ["VLPATCH_MEDIA_FIRST"] == "1"
        assert fakeup.target(1) == 4, "patched once, not twice"
        """,
    )


def test_a_later_apply_takes_force_back(upstream):
    d = upstream(version="2.0")
    proc = run(
        d,
        """
        import fakeup, vlpatch
        vlpatch.apply(force=True)
        assert fakeup.target(1) == 4 and vlpatch.status()[0]["reason"].startswith("forced")
        for _ in range(2):  # the trainer is imported: apply() itself stops, each time it is asked
            try:
                vlpatch.apply(force=False)
            except vlpatch.UnknownUpstreamError:
                pass
            else:
                raise SystemExit("apply(force=False) left the imported trainer unprotected without a word")
            assert fakeup.target(1) == 2 and vlpatch.status()[0]["state"] == "refused"
        """,
    )
    assert proc.stderr.count("refused") == 1, "decided once under the same settings: " + proc.stderr


def test_status_tells_excluded_from_not_installed(upstream):
    d = upstream()
    env = {**os.environ, "PYTHONPATH": str(d), "VLPATCH_MATRIX": str(d / "matrix.yaml"), "VLPATCH_EXCLUDE": "fake.double"}
    env.pop("VLPATCH", None)
    out = subprocess.run([os.path.join(os.path.dirname(sys.executable), "vlpatch"), "status"], env=env, capture_output=True, text=True)
    assert "fake.double: excluded (1.0) - excluded by you (VLPATCH_EXCLUDE)" in out.stdout, out.stdout + out.stderr
    env["VLPATCH_EXCLUDE"] = ""
    (d / "fakeup-1.0.dist-info" / "METADATA").unlink()
    (d / "fakeup-1.0.dist-info").rmdir()
    out = subprocess.run([os.path.join(os.path.dirname(sys.executable), "vlpatch"), "status"], env=env, capture_output=True, text=True)
    assert "fake.double: skipped (fakeup not installed) - fakeup is not installed" in out.stdout, out.stdout + out.stderr


def test_cli_rejects_unknown_patch_ids_and_bad_settings(upstream):
    d = upstream()
    env = {**os.environ, "PYTHONPATH": str(d), "VLPATCH_MATRIX": str(d / "matrix.yaml")}
    env.pop("VLPATCH", None)
    cli = os.path.join(os.path.dirname(sys.executable), "vlpatch")
    out = subprocess.run([cli, "fingerprint", "fake.doubel"], env=env, capture_output=True, text=True)
    assert out.returncode == 2 and "'fake.doubel' is not a patch id" in out.stderr and "did you mean 'fake.double'" in out.stderr, out.stderr
    out = subprocess.run([cli, "status"], env={**env, "VLPATCH_POLICY": "dropmedia"}, capture_output=True, text=True)
    assert out.returncode == 2 and "VLPATCH_POLICY='dropmedia'" in out.stderr, out.stderr


def test_post_import_hooks_keep_the_real_loader_and_fire_on_reimport(upstream):
    # vlpatch's own post-import hooks (vlpatch._hooks): the module keeps its real loader (source
    # readable, so fingerprints work), and a module imported again after leaving sys.modules is patched again
    d = upstream()
    run(
        d,
        """
        import inspect, sys, vlpatch
        vlpatch.apply()
        import fakeup
        assert type(fakeup.__loader__).__name__ == "SourceFileLoader" and fakeup.__spec__.loader is fakeup.__loader__
        assert "return x + 1" in inspect.getsource(fakeup.target.__wrapped__)
        fired = []
        from vlpatch import _hooks
        _hooks.when_imported("fakeup", lambda m: fired.append(m.__name__))
        del sys.modules["fakeup"]
        import fakeup
        assert fired == ["fakeup"], fired
        """,
    )


@pytest.mark.heavy
def test_vlpatch_1_that_fails_inside_refuses_trainer_imports(tmp_path):
    # not a typo but any failure of auto-enable (here: a matrix file that is not YAML): never run unprotected
    broken = tmp_path / "broken.yaml"
    broken.write_text("patches: [unclosed\n")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("VLPATCH")}, "VLPATCH": "1", "VLPATCH_MATRIX": str(broken)}
    other = subprocess.run([sys.executable, "-c", "print('alive')"], env=env, capture_output=True, text=True)
    assert other.returncode == 0 and other.stdout.strip() == "alive", other.stderr
    assert "auto-enable (VLPATCH) failed" in other.stderr and "stops if it imports llamafactory.data.loader" in other.stderr, other.stderr
    import importlib.util

    if importlib.util.find_spec("llamafactory") is not None:
        trainer = subprocess.run([sys.executable, "-c", "import llamafactory.data.loader"], env=env, capture_output=True, text=True)
        assert trainer.returncode != 0 and "rather than run unprotected" in trainer.stderr, trainer.stderr[-2000:]


def test_a_finished_report_run_leaves_no_trace_in_the_environment(tmp_path):
    """end_run() takes the run out of the environment (VLPATCH_RUN), also after it recorded the reasons:
    a run left behind would collect the next run's rows."""
    from collections import Counter

    from vlpatch import report

    run = report.start_run("t", "x", str(tmp_path / "r.jsonl"))
    report.tally(Counter({"dropped": 1}), Counter({"bad_input": 1}))
    report.end_run(run, quiet=True)
    assert run.reasons == Counter({"bad_input": 1})
    assert "VLPATCH_RUN" not in os.environ and report.current_run() is None
