"""The smoke suite per upstream version, generated from compat_matrix.yaml (`smoke:`).

    python scripts/sessions.py list                      the sessions, one line each
    python scripts/sessions.py setup [NAME ...]          create or reuse their environments
    python scripts/sessions.py test  [NAME ...] [-- PYTEST ARGS]
    python scripts/sessions.py canary                    the newest releases, whatever the matrix says

NAME: a session (`llamafactory-0.9.2`), a distribution (`unsloth_zoo`: all its sessions) or `demo`.
No NAME: every session (or VLPATCH_SESSIONS, comma-separated). Every environment sees one shared
torch stack through a `.pth` file, so a session costs its own small packages only. `test` runs every
selected session even after a failure, then prints one table (setup and test time per session) and
exits non-zero if any session failed. Needs PyYAML (scripts/setup.sh runs this with the torch
environment's Python, where it installs it).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MATRIX = os.path.join(ROOT, "vlpatch", "compat_matrix.yaml")
TEST_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "CUDA_VISIBLE_DEVICES": "",
    "TOKENIZERS_PARALLELISM": "false",
    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
}


def load() -> dict:
    with open(MATRIX, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def name_of(session: dict) -> str:
    return f"{session['distribution']}-{session['version']}"


def select(smoke: dict, names: list) -> list:
    sessions = smoke["sessions"]
    names = names or [n for n in os.environ.get("VLPATCH_SESSIONS", "").split(",") if n.strip()]
    if not names:
        return sessions
    out = []
    for n in names:
        hit = [s for s in sessions if n in (name_of(s), s["distribution"]) or (n == "demo" and s.get("demo"))]
        if not hit:
            sys.exit(f"sessions: no session {n!r}; `python scripts/sessions.py list` shows them")
        out += [s for s in hit if s not in out]
    return out


def log(msg: str) -> None:
    print(f"sessions: {msg}", flush=True)


def pip(python: str, *args: str) -> None:
    cmd = [python, "-m", "pip", "install", "-q", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **TEST_ENV}, stderr=subprocess.PIPE, text=True)
    noise = "is ignored: it is neither"  # this machine's local indexes
    err = "\n".join(line for line in proc.stderr.splitlines() if noise not in line)
    if err:
        print(err, file=sys.stderr)
    if proc.returncode:
        raise RuntimeError(f"pip install {' '.join(args)} failed ({proc.returncode})")


def python_of(env: str) -> str:
    return os.path.join(ROOT, env, "bin", "python")


def purelib(env: str) -> str:
    out = subprocess.check_output([python_of(env), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True)
    return out.strip()


def stamp(env: str, key: str) -> str:
    return os.path.join(ROOT, env, ".vlpatch-setup-" + "".join(c if c.isalnum() or c in ".-" else "_" for c in key))


def make_venv(env: str) -> None:
    if not os.path.exists(python_of(env)):
        base = os.environ.get("PYTHON") or sys.executable
        # the torch environment's Python is itself a venv: create from its base interpreter
        base = getattr(sys, "_base_executable", base) if base == sys.executable else base
        subprocess.run([base, "-m", "venv", os.path.join(ROOT, env)], check=True)


def install_once(env: str, requirements: list, key: str, upgrade: bool = False) -> None:
    """pip install `requirements` into `env` once per `key` (a stamp file), or every time with `upgrade`."""
    done = stamp(env, key)
    if upgrade or not os.path.exists(done):
        t = time.time()
        pip(python_of(env), *(["--upgrade"] if upgrade else []), *requirements)
        open(done, "w").close()
        log(f"{env} ({key}) installed in {time.time() - t:.0f}s")


def setup_torch(smoke: dict) -> str:
    env = smoke["torch_env"]
    spec = os.environ.get("VLPATCH_TORCH_SPEC", "").split() or smoke["torch"]
    make_venv(env)
    install_once(env, spec, " ".join(spec))
    return env


def install_env(smoke: dict, env: str, requirements: list, key: str, upgrade: bool = False) -> float:
    """Create `env` on top of the shared torch stack; install once per `key`; vlpatch itself, editable."""
    t = time.time()
    make_venv(env)
    torch_lib = purelib(smoke["torch_env"])
    with open(os.path.join(purelib(env), "_vlpatch_torch_base.pth"), "w") as fh:
        fh.write(torch_lib + "\n")
    torchrun = os.path.join(ROOT, env, "bin", "torchrun")  # torch's console script, for this env's Python
    if not os.path.exists(torchrun):
        with open(torchrun, "w") as fh:
            fh.write('#!/bin/sh\nexec "$(dirname "$0")/python" -m torch.distributed.run "$@"\n')
        os.chmod(torchrun, 0o755)
    install_once(env, requirements, key, upgrade)
    pip(python_of(env), "-e", f"{ROOT}[test]")
    return time.time() - t


def setup_session(smoke: dict, s: dict) -> float:
    reqs = [f"{s['distribution']}=={s['version']}", *s.get("with", [])]
    seconds = install_env(smoke, s["env"], reqs, " ".join(reqs))
    versions = subprocess.check_output(
        [python_of(s["env"]), "-c", VERSIONS, s["distribution"]], text=True, cwd=ROOT
    ).strip()
    log(f"{s['env']} {versions}")
    return seconds


VERSIONS = (
    "import importlib.metadata as m, sys\n"
    "def v(d):\n"
    "    try: return m.version(d)\n"
    "    except m.PackageNotFoundError: return '-'\n"
    "print(sys.argv[1], v(sys.argv[1]), '| transformers', v('transformers'), '| torch', v('torch'))\n"
)


def run_suite(smoke: dict, s: dict, pytest_args: list) -> tuple:
    suite = smoke["suites"][s["suite"]]
    env = {**os.environ, **TEST_ENV}
    env.pop("VLPATCH", None)
    env["VLPATCH_STRICT"] = suite.get("strict", "")
    env["VLPATCH_EXPECT"] = s.get("expect", "")
    cmd = [python_of(s["env"]), "-m", "pytest", "-ra", *suite["args"], *pytest_args]
    log(f"== {s.get('name') or name_of(s)}: {' '.join(shlex.quote(c) for c in cmd[1:])}")
    t = time.time()
    code = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    return code, time.time() - t


def table(rows: list, header: list) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def cmd_setup(smoke, names, _):
    setup_torch(smoke)
    for s in select(smoke, names):
        setup_session(smoke, s)
    return 0


def cmd_test(smoke, names, pytest_args):
    setup_torch(smoke)
    rows, failed = [], 0
    for s in select(smoke, names):
        try:
            setup_s = setup_session(smoke, s)
        except Exception as exc:  # a session that cannot be set up fails, the others still run
            rows.append([name_of(s), s["env"], "-", "-", f"SETUP FAILED: {exc}"])
            failed += 1
            continue
        code, test_s = run_suite(smoke, s, pytest_args)
        result = "passed" if code == 0 else f"FAILED (pytest exit {code})"
        if s.get("expect") == "refused" and code == 0:
            result = "passed: refused as expected"
        failed += code != 0
        rows.append([name_of(s), s["env"], f"{setup_s:.0f}s", f"{test_s:.0f}s", result])
    print("\nsmoke sessions (setup: environment check or install; tests: pytest wall time)")
    print(table(rows, ["session", "environment", "setup", "tests", "result"]))
    return 1 if failed else 0


CANARY_PROBE = """
import json, sys
from vlpatch import doctor
print("CANARY " + json.dumps(doctor.report(distributions=[sys.argv[1]], selftest=False)))
"""


def cmd_canary(smoke, names, pytest_args):
    """Install the newest release of each canary distribution and report, in one table: version, what the
    matrix says of it, fingerprint drift of each target, and the smoke result."""
    setup_torch(smoke)
    rows, notes, failed = [], [], 0
    for c in smoke["canary"]:
        dist, env = c["distribution"], c["env"]
        try:
            install_env(smoke, env, [dist, *c.get("with", [])], f"{dist} newest", upgrade=True)
        except Exception as exc:
            rows.append([dist, "-", "-", "-", f"SETUP FAILED: {exc}"])
            failed += 1
            continue
        out = subprocess.run(
            [python_of(env), "-c", CANARY_PROBE, dist], cwd=ROOT, env={**os.environ, **TEST_ENV}, capture_output=True, text=True
        )
        probe = next((json.loads(x[7:]) for x in out.stdout.splitlines() if x.startswith("CANARY ")), None)
        if probe is None:
            rows.append([dist, "-", "-", "-", f"PROBE FAILED: {out.stderr.strip()[-300:]}"])
            failed += 1
            continue
        version = probe["versions"].get(dist)
        patches = [p for p in probe["patches"] if p["distribution"] == dist]
        listed = any(version in p["tested"] for p in patches)
        in_range = [p["id"] for p in patches if p["in_applies"]]
        matrix_says = "tested" if listed else (f"in range of {', '.join(in_range)}, untested" if in_range else "outside")
        drift = []
        for p in patches:
            for target, d in (p.get("drift") or {}).items():
                if d["found"] != d["expected"]:
                    drift.append(f"{target.split(':')[1]} vs {d['against']}")
        drift_text = ", ".join(drift) if drift else "none"
        session = {**c, "version": version, "name": f"canary {dist}-{version}"}
        if listed:
            code, _ = run_suite(smoke, session, pytest_args)
            result = "passed" if code == 0 else f"FAILED (pytest exit {code})"
        else:  # never patched blindly: the refusal itself is the smoke test
            code, _ = run_suite(smoke, {**session, "suite": "refused", "expect": "refused"}, pytest_args)
            result = "refused with a warning, upstream untouched" if code == 0 else f"FAILED: not refused cleanly ({code})"
            notes += [f"{dist} {version}: {p['id']}: {p['state']}: {p['reason']}" for p in patches if p["state"] != "skipped" or p["in_applies"]]
        failed += code != 0
        rows.append([dist, version, matrix_says, drift_text, result])
    print("\ncanary: the newest release of each upstream")
    print(table(rows, ["upstream", "newest", "compat matrix", "fingerprint drift", "smoke"]))
    for n in notes:
        print("  " + n)
    return 1 if failed else 0


def cmd_list(smoke, names, _):
    for s in select(smoke, names):
        extra = f" (expect {s['expect']})" if s.get("expect") else ""
        print(f"{name_of(s):28} {s['env']:16} suite {s['suite']:12} with {' '.join(s.get('with', []))}{extra}")
    return 0


def main(argv: list) -> int:
    if "--" in argv:
        i = argv.index("--")
        argv, pytest_args = argv[:i], argv[i + 1 :]
    else:
        pytest_args = []
    if not argv or argv[0] not in ("list", "setup", "test", "canary"):
        print(__doc__)
        return 2
    smoke = load()["smoke"]
    return {"list": cmd_list, "setup": cmd_setup, "test": cmd_test, "canary": cmd_canary}[argv[0]](smoke, argv[1:], pytest_args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
