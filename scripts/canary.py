"""The canary: the newest release of each upstream from the index, whatever the matrix says. For each, its
matrix status (tested, protected by code identical to a tested release's, or a new code shape that vlpatch
refuses), fingerprint drift, and a smoke run; a table at the end. It reports, and does not fail CI (.ci/run).

    python scripts/sessions.py canary [-- PYTEST ARGS]

noxfile.py's `canary-<distribution>` sessions call `newest_release`, `tested_twin` and `canary_row`; the
session data and the runner it shares are scripts/sessions.py's.
"""

from __future__ import annotations

import os

from sessions import (
    ROOT,
    TIMINGS,
    freeze,
    name_of,
    print_session_log,
    resolve,
    rows_of,
    session_python,
    start_session,
    table,
)

CANARY = os.path.join(ROOT, ".nox", "vlpatch-canary.jsonl")  # one row per canary session

CANARY_PROBE = """
import json, sys
from vlpatch import doctor
print("CANARY " + json.dumps(doctor.report(distributions=[sys.argv[1]], selftest=False)))
"""



def newest_release(dist: str) -> str | None:
    """The newest release of `dist` on the index for this Python (its own requirements aside: resolving it
    with its dependencies can pick an older release, as uv did for llamafactory, 0.8.3 over 0.9.5, once a
    transformers newer than 0.9.5's cap came out)."""
    pins = resolve([dist], no_deps=True)
    return pins[0].partition("==")[2] if pins else None


def tested_twin(smoke: dict, dist: str, version: str, mine: list | None) -> str | None:
    """The tested session of `dist` `version` whose environment holds every distribution of `mine` (the
    canary's, installed or resolved), each at the same version, and whose tests passed in the last test run
    (TIMINGS), else None. (The tested session may hold more: llamafactory-0.9.5 adds torchcodec.)"""
    if mine is None:
        return None
    for s in smoke["sessions"]:
        name = name_of(s)
        if s["distribution"] != dist or s["version"] != version or s.get("expect"):
            continue
        if not any(r[0] == name and r[3] == "passed" for r in rows_of(TIMINGS)):
            continue
        python = session_python(name)
        theirs = freeze(python) if os.path.exists(python) else None
        if theirs is not None and set(mine) <= set(theirs):
            return name
    return None


def canary_row(probe: dict | None, dist: str) -> list:
    """[upstream, newest, compat matrix, fingerprint drift, smoke] from vlpatch doctor's report."""
    if probe is None:
        return [dist, "-", "-", "-", "PROBE FAILED"]
    version = probe["versions"].get(dist)
    patches = [p for p in probe["patches"] if p["distribution"] == dist]
    listed = any(version in p["tested"] for p in patches)
    vouched = sorted({p["vouched_by"] for p in patches if p.get("vouched_by")})
    refused = [p["id"] for p in patches if p["state"] == "refused"]
    if listed:
        says = "tested"
    elif vouched and not refused:  # the lock's rule: its code equals a tested release's, protected as it is
        says = f"protected: code identical to tested {', '.join(vouched)}"
    elif refused:
        says = (f"NEW CODE SHAPE, refused ({', '.join(refused)}): run `python scripts/lock.py` (its lines below), then "
                f"add `{version}` to the patch's `tested` and a session {{distribution: {dist}, version: \"{version}\", suite: ...}}")
    else:
        says = "outside"
    drift = [
        f"{target.split(':')[1]} vs {d['against']}"
        for p in patches
        for target, d in (p.get("drift") or {}).items()
        if d["found"] != d["expected"]
    ]
    return [dist, version, says, ", ".join(drift) or "none", "-"]


def cmd_canary(smoke, names, pytest_args) -> int:
    """The canary sessions side by side (each mostly waits on the index and on importing its upstream:
    23 s one after another, on CI), each one's output printed whole when it ends; then the table."""
    if os.path.exists(CANARY):
        os.unlink(CANARY)
    dists = [c["distribution"] for c in smoke["canary"]]
    extra = ["--", *pytest_args] if pytest_args else []
    running = [(f"canary-{d}", start_session(f"canary-{d}", ["--sessions", f"canary-{d}", *extra], True)) for d in dists]
    code = 0
    for name, (proc, path, began) in running:
        proc.wait()
        code = proc.returncode or code
        print_session_log(name, proc, path, began)
    rows = sorted(rows_of(CANARY), key=lambda r: dists.index(r[0]) if r[0] in dists else len(dists))
    print("\ncanary: the newest release of each upstream")
    print(table(rows, ["upstream", "newest", "compat matrix", "fingerprint drift", "smoke"]))
    return code
