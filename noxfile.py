"""The smoke suite as nox sessions, generated from sessions.yaml (`smoke:`), with uv as the backend.

    nox -l                              one session per tested upstream release, plus the canaries
    nox -s llamafactory-0.9.2           one session (environment under .nox/, reused)
    nox -t unsloth_zoo                  every session of one upstream
    nox -s canary-llamafactory          the newest release from PyPI, whatever the matrix says

`bash scripts/test.sh` runs every default session (the canaries are not default) and prints a table of
what each took. uv installs each environment from its cache by hard links, the torch stack included
(`smoke.torch`, or VLPATCH_TORCH_SPEC), so a session costs seconds once the cache holds the wheels.
"""

from __future__ import annotations

import json
import os
import sys
import time

import nox

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts"))
import canary  # noqa: E402  (scripts/canary.py: the newest releases, for the canary sessions)
import sessions as smoke  # noqa: E402  (scripts/sessions.py: the matrix's sessions as data)

os.environ.update(smoke.uv_env())
nox.options.default_venv_backend = "uv"
nox.options.reuse_venv = "yes"
nox.options.error_on_missing_interpreters = True
PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"
SMOKE = smoke.load()["smoke"]
nox.options.sessions = [smoke.name_of(s) for s in SMOKE["sessions"]]


def _install(session, *args: str) -> None:
    """uv installs (hard links from its cache, no bytecode), then scripts/bytecode.py compiles the bytecode,
    linking each .pyc another environment already compiled for the same file (the torch stack in all)."""
    session.install(*args)
    session.run_install("python", os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts", "bytecode.py"))


def _pytest(session, s: dict, args: list) -> None:
    suite = SMOKE["suites"][s["suite"]]
    env = {**smoke.TEST_ENV, **suite.get("env", {}), "VLPATCH_STRICT": suite.get("strict", ""), "VLPATCH_EXPECT": s.get("expect", "")}
    session.run("python", "-m", "pytest", "-ra", *suite["args"], *args, env=env)


def _smoke_session(s: dict):
    def run(session):
        start = time.time()
        if os.environ.get(smoke.PHASE) == "install":  # scripts/sessions.py: environments made ahead of the tests
            ok = False
            try:
                _install(session, *smoke.torch_spec(SMOKE), *smoke.requirements(s), "-e", ".[test]")
                ok = True
            finally:
                smoke.record(smoke.INSTALLS, [smoke.name_of(s), round(time.time() - start), ok])
            return
        result, setup_s = "FAILED", None
        try:
            _install(session, *smoke.torch_spec(SMOKE), *smoke.requirements(s), "-e", ".[test]")
            setup_s = time.time() - start
            session.run("python", "scripts/sessions.py", "versions", s["distribution"])
            _pytest(session, s, session.posargs)
            result = "passed: refused as expected" if s.get("expect") == "refused" else "passed"
        finally:
            smoke.record(smoke.TIMINGS, [smoke.name_of(s), f"{setup_s:.0f}s" if setup_s is not None else "-",
                                         f"{time.time() - start - (setup_s or 0):.0f}s", result])

    run.__doc__ = f"{s['distribution']} {s['version']} with {' '.join(s.get('with', [])) or 'its own pins'}" + (
        f" (expect {s['expect']})" if s.get("expect") else "")
    return nox.session(name=smoke.name_of(s), python=PYTHON, tags=[s["distribution"]])(run)


def _canary_session(c: dict):
    def run(session):
        dist = c["distribution"]
        row = [dist, "-", "-", "-", "SETUP FAILED"]

        def probe(python: str) -> list:
            out = session.run(python, "-c", canary.CANARY_PROBE, dist, silent=True, env=smoke.TEST_ENV, external=True)
            return canary.canary_row(next((json.loads(x[7:]) for x in out.splitlines() if x.startswith("CANARY ")), None), dist)

        try:
            newest = canary.newest_release(dist)
            if newest is None:
                row[4] = "SETUP FAILED: no release of it found on the index"
                return
            spec = [*smoke.torch_spec(SMOKE), f"{dist}=={newest}", *c.get("with", [])]
            # resolved, not installed: where that is within a tested session that passed in this run (every
            # distribution at the same version), the probe runs there and nothing is installed or repeated
            twin = canary.tested_twin(SMOKE, dist, newest, smoke.resolve(spec))
            if twin:
                row = probe(smoke.session_python(twin))
                if row[2] == "tested":  # (a release protected by identical code runs its own smoke below)
                    row[4] = f"passed: it resolves within {twin}'s environment, whose tests passed in this run"
                    return
            _install(session, *spec, "-e", ".[test]")
            row = probe(os.path.join(session.bin, "python"))
            expect = None if row[2] == "tested" or row[2].startswith("protected") else "refused"
            if row[2].startswith("NEW CODE SHAPE"):  # the lock lines a maintainer adds: read from the wheel
                session.run("python", "scripts/lock.py", "--check", external=True, success_codes=[0, 1])
            s = {**c, "version": row[1], "suite": c["suite"] if expect is None else "refused", "expect": expect or ""}
            row[4] = "FAILED" if expect is None else "FAILED: not refused cleanly"
            twin = expect is None and canary.tested_twin(SMOKE, dist, row[1], smoke.freeze(os.path.join(session.bin, "python")))
            if twin:  # its distributions, each at the same version: the tested session's tests passed just now
                row[4] = f"passed: its environment is within {twin}'s, whose tests passed in this run"
                return
            _pytest(session, s, session.posargs)
            row[4] = "passed" if expect is None else "refused: a protected process stops at its import, upstream untouched"
        finally:
            smoke.record(canary.CANARY, row)

    run.__doc__ = f"the newest {c['distribution']} from PyPI: matrix status, fingerprint drift, smoke"
    return nox.session(name=f"canary-{c['distribution']}", python=PYTHON, tags=["canary"])(run)


for _s in SMOKE["sessions"]:
    _smoke_session(_s)
for _c in SMOKE["canary"]:
    _canary_session(_c)
