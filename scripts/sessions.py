"""The smoke sessions of sessions.yaml (`smoke:`) as data, for noxfile.py, and the runner around nox (the
canary, which tries the newest upstream releases, is scripts/canary.py; `canary` below runs it).

    python scripts/sessions.py list                      the sessions, one line each
    python scripts/sessions.py test [NAME ...] [-- PYTEST ARGS]
                                                         run them through nox, then print the timing table
    python scripts/sessions.py canary [-- PYTEST ARGS]   the newest releases, whatever the matrix says
    python scripts/sessions.py requirements NAME         the torch stack and a session's pins, one per line

NAME: a session (`llamafactory-0.9.2`), a distribution (`unsloth_zoo`: all its sessions) or `demo` (the
session marked `demo: true`). No NAME: every session (or VLPATCH_SESSIONS, comma-separated). Run with
the tools environment's Python (`.venv-tools`, made by scripts/setup.sh), which has nox, uv and PyYAML.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SESSIONS = os.path.join(ROOT, "sessions.yaml")  # the test sessions: repository data, not in the wheel
TIMINGS = os.path.join(ROOT, ".nox", "vlpatch-timings.jsonl")
INSTALLS = os.path.join(ROOT, ".nox", "vlpatch-installs.jsonl")  # [session, seconds, ok] from the install pass
INSTALL_LOG = os.path.join(ROOT, ".nox", "vlpatch-installs.log")
PHASE = "VLPATCH_NOX_PHASE"  # "install": noxfile.py's sessions make their environment and stop
TEST_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "CUDA_VISIBLE_DEVICES": "",
    "TOKENIZERS_PARALLELISM": "false",
    "VLPATCH": "",  # a suite decides for itself where vlpatch is on
    # one torch (OpenMP) thread per test process: the sessions share the cores, one process per core (or one
    # xdist worker per core), and torch's default pool (a thread per core in each process) spins waiting for
    # its threads on a shared 2-core machine; no token or result depends on it (tests/test_llamafactory_corpus.py
    # and benchmarks/ set it in process for the same reason). llamafactory-0.9.4's tests: 150 s -> 106 s
    "OMP_NUM_THREADS": "1",
}
# uv: never download a Python, install from its cache by hard links (the torch stack is 4.7 GB). Bytecode is
# compiled at install (noxfile.py: scripts/bytecode.py, which links the .pyc of files other environments
# already compiled). Without any .pyc (uv's default, where the environment also says PYTHONDONTWRITEBYTECODE)
# every test subprocess compiles transformers and LLaMA-Factory again: a 0.9.5 session took 873 s instead of
# about 330 s. Letting the tests write it lazily instead was slower still (0.9.2: 202 s of tests instead of
# 134 s, for 25 s less setup).
UV_ENV = {"UV_PYTHON_DOWNLOADS": "never", "UV_LINK_MODE": "hardlink", "UV_COMPILE_BYTECODE": "0"}


def uv_env() -> dict:
    """UV_ENV, where the caller's environment does not set a variable itself."""
    return {k: os.environ.get(k, v) for k, v in UV_ENV.items()}


def load() -> dict:
    with open(SESSIONS, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def name_of(session: dict) -> str:
    return f"{session['distribution']}-{session['version']}"


def torch_spec(smoke: dict) -> list:
    return os.environ.get("VLPATCH_TORCH_SPEC", "").split() or list(smoke["torch"])


def requirements(s: dict) -> list:
    return [f"{s['distribution']}=={s['version']}", *s.get("with", [])]


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


def cmd_versions(smoke, names, _) -> int:
    """The upstream, transformers and torch versions of the running environment (each nox session)."""
    import importlib.metadata as m

    def v(d):
        try:
            return m.version(d)
        except m.PackageNotFoundError:
            return "-"

    print("sessions:", " | ".join(f"{d} {v(d)}" for d in [*names, "transformers", "torch"]))
    return 0

FREEZE = "import importlib.metadata as m, json; print(json.dumps(sorted({d.metadata['Name'] + '==' + d.version for d in m.distributions()})))"


def _pin(line: str) -> str:
    """name==version with the name normalized (PEP 503), so that uv's and importlib's spellings compare."""
    name, _, version = line.strip().partition("==")
    return re.sub(r"[-_.]+", "-", name).lower() + "==" + version


def freeze(python: str) -> list | None:
    """Every distribution of the environment of `python` as name==version, vlpatch left out; None if it fails."""
    try:
        out = subprocess.run([python, "-c", FREEZE], capture_output=True, text=True, timeout=120, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return _without_vlpatch(_pin(d) for d in json.loads(out.strip().splitlines()[-1]))


def resolve(requirements: list, no_deps: bool = False) -> list | None:
    """What uv would install for `requirements` (with vlpatch's test extras) into a fresh environment of this
    Python, as name==version (vlpatch left out), without installing anything; None if it cannot resolve."""
    import uv  # the tools environment's uv (scripts/setup.sh)

    cmd = [uv.find_uv_bin(), "pip", "compile", "-q", "--no-header", "--no-annotate",
           "--python-version", f"{sys.version_info[0]}.{sys.version_info[1]}", *(["--no-deps"] if no_deps else []), "-"]
    lines = [*requirements, *([] if no_deps else ["-e .[test]"])]
    try:
        out = subprocess.run(cmd, input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=300,
                             check=True, cwd=ROOT, env={**os.environ, **uv_env()}).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return _without_vlpatch(_pin(x) for x in out.splitlines() if "==" in x and not x.lstrip().startswith(("-", "#")))


def _without_vlpatch(pins) -> list:
    return [p for p in pins if not p.startswith("vlpatch==")]


def session_python(name: str) -> str:
    return os.path.join(ROOT, ".nox", re.sub(r"[^\w\-]", "-", name), "bin", "python")


def record(path: str, row: list) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


def rows_of(path: str) -> list:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def table(rows: list, header: list) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def _nox_cmd(*args: str) -> list:
    return [sys.executable, "-m", "nox", "--noxfile", os.path.join(ROOT, "noxfile.py"), *args]


def test_cores() -> int:
    """Cores the sessions share: VLPATCH_TEST_CORES, else the machine's."""
    return max(1, int(os.environ.get("VLPATCH_TEST_CORES") or os.cpu_count() or 1))


def cores_of(smoke: dict, s: dict, total: int) -> int:
    """A session's share of `total`: its suite's `cores:` (1: one pytest process, no xdist), else all."""
    return max(1, min(total, int(smoke["suites"][s["suite"]].get("cores") or total)))


def seconds_of(smoke: dict, s: dict) -> float:
    """A session's rough test time (its own `seconds:`, else its suite's; 0 where neither says): the order
    only, never a limit."""
    return float(s.get("seconds") or smoke["suites"][s["suite"]].get("seconds") or 0)


def run_order(smoke: dict, sessions: list) -> list:
    """The demo's session first (its environment is what the demo's run just put into uv's cache, made in
    seconds, and its tests are the longest: the other environments are made meanwhile), then the longest
    first (`seconds_of`; the matrix's order among equals): the run no longer ends on one long session while
    the other cores idle (the ms-swift 4.6.0 session, last in the matrix, ran its 166 s alone at the end),
    and the background pass makes the short sessions' environments while the long sessions' tests run."""
    return sorted(sessions, key=lambda s: (not s.get("demo"), -seconds_of(smoke, s)))


def cmd_test(smoke, names, pytest_args) -> int:
    """Every chosen session's tests, one nox run each, started in `run_order`; meanwhile one background nox
    run makes the environments, in the same order (downloads and linking wait on the network and the
    disk, not on the cores that the tests use). A session's tests start once its environment is made and
    its cores are free (`cores_of`): pytest-xdist sessions take every core and run alone, streaming to this
    terminal; one-process sessions (`cores: 1`) run side by side, each one's output going to
    .nox/vlpatch-session-NAME.log and printed whole when it ends. Where making an environment failed, its
    session runs as usual (it makes its environment again and fails visibly)."""
    for path in (TIMINGS, INSTALLS):
        if os.path.exists(path):
            os.unlink(path)
    start = time.time()
    listed = select(smoke, names)
    total = test_cores()
    need = {name_of(s): cores_of(smoke, s, total) for s in listed}
    chosen = [name_of(s) for s in run_order(smoke, listed)]
    os.makedirs(os.path.dirname(INSTALL_LOG), exist_ok=True)
    with open(INSTALL_LOG, "w") as log:
        # niced: the tests are the critical path (bytecode compiling beside the older releases' tests slowed
        # them from about 110 s to 160 - 200 s each); the newest LLaMA-Factory's 6 minutes of tests come first,
        # and the pass makes the other environments behind them (a fresh clone: mostly, not always, in time)
        installer = subprocess.Popen(_nox_cmd("--install-only", "--sessions", *chosen), cwd=ROOT, stdout=log,
                                     stderr=subprocess.STDOUT, env={**os.environ, PHASE: "install"},
                                     preexec_fn=lambda: os.nice(15))
    print(f"sessions: environments are made in the background (log: {os.path.relpath(INSTALL_LOG, ROOT)}); "
          f"{total} core(s) shared", flush=True)
    code, pending, running, free = 0, list(chosen), {}, total
    extra = ["--", *pytest_args] if pytest_args else []
    try:
        while pending or running:
            while pending and need[pending[0]] <= free:
                made = _install_state(pending[0], installer)
                if made is None:  # its environment is still being made: sessions start in order
                    break
                name = pending.pop(0)
                flags = ["-R"] if made else []  # -R: reuse the environment, install nothing
                running[name] = start_session(name, [*flags, "--sessions", name, *extra], need[name] < total)
                free -= need[name]
            for name, (proc, path, began) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                free += need[name]
                code = proc.returncode or code
                print_session_log(name, proc, path, began)
            time.sleep(0.5)
    finally:
        for proc, _path, _began in running.values():
            proc.terminate()
        if installer.poll() is None:
            installer.terminate()
        installer.wait()
    made = {r[0]: r for r in rows_of(INSTALLS)}
    done = {r[0]: r for r in rows_of(TIMINGS)}
    rows = []
    for s in listed:
        n = name_of(s)
        r = done.get(n, [n, "-", "-", "NOT RUN"])
        if n in made and made[n][2]:
            r = [n, f"{made[n][1]}s", *r[2:]]
        rows.append([*r[:3], str(need[n]), *r[3:]])
    print("\nsmoke sessions (setup: uv install into the .nox environment, in the background while earlier "
          "sessions' tests ran; tests: pytest wall time; cores: the session's share, one-process sessions side by side)")
    print(table(rows, ["session", "setup", "tests", "cores", "result"]))
    print(f"sessions: {time.time() - start:.0f}s wall in all")
    if any(not r[2] for r in made.values()):
        print(f"sessions: making an environment failed in the background pass; see {os.path.relpath(INSTALL_LOG, ROOT)}")
    return code


def start_session(name: str, args: list, to_log: bool) -> tuple:
    """A nox run of one session: (process, its log or None where it writes to this terminal, start time)."""
    path = os.path.join(ROOT, ".nox", f"vlpatch-session-{name}.log") if to_log else None
    out = open(path, "w", encoding="utf-8") if path else None  # noqa: SIM115 (the child holds it)
    try:
        proc = subprocess.Popen(_nox_cmd(*args), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT if out else None)
    finally:
        if out:
            out.close()
    if path:
        print(f"sessions: {name} started (log: {os.path.relpath(path, ROOT)})", flush=True)
    return proc, path, time.time()


def print_session_log(name: str, proc, path: str | None, began: float) -> None:
    """A finished session's log, whole (nothing where it wrote to this terminal)."""
    if path:
        with open(path, encoding="utf-8", errors="replace") as fh:
            print(f"\n===== {name}: exit {proc.returncode} after {time.time() - began:.0f}s "
                  f"(log: {os.path.relpath(path, ROOT)}) =====", flush=True)
            sys.stdout.write(fh.read())
            sys.stdout.flush()


def _install_state(name: str, installer) -> bool | None:
    """True once the background pass has made `name`'s environment, False where it failed or stopped,
    None while it is still to come."""
    finished = installer.poll() is not None
    try:
        row = next((r for r in rows_of(INSTALLS) if r[0] == name), None)
    except ValueError:  # a line being written
        row = None
    if row is not None:
        return bool(row[2])
    return False if finished else None


def cmd_requirements(smoke, names, _) -> int:
    """One requirement per line: the torch stack and the selected session's pins (scripts/setup.sh)."""
    for s in select(smoke, names):
        print("\n".join([*torch_spec(smoke), *requirements(s)]))
    return 0


def cmd_list(smoke, names, _) -> int:
    for s in select(smoke, names):
        extra = f" (expect {s['expect']})" if s.get("expect") else ""
        print(f"{name_of(s):28} suite {s['suite']:18} with {' '.join(s.get('with', []))}{extra}")
    return 0


def main(argv: list) -> int:
    if "--" in argv:
        i = argv.index("--")
        argv, pytest_args = argv[:i], argv[i + 1 :]
    else:
        pytest_args = []
    if argv and argv[0] == "canary":  # scripts/canary.py: the newest releases, whatever the matrix says
        import canary

        return canary.cmd_canary(load()["smoke"], argv[1:], pytest_args)
    commands = {"list": cmd_list, "test": cmd_test, "requirements": cmd_requirements, "versions": cmd_versions}
    if not argv or argv[0] not in commands:
        print(__doc__)
        return 2
    return commands[argv[0]](load()["smoke"], argv[1:], pytest_args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
