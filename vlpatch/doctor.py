"""`vlpatch doctor`: what is installed, what each patch does here and why, and a quick self-test.

Imports upstream code (the hook modules of the installed upstreams) but never downloads a model.
Exit code (from `main`): 0 when every patch meant for an installed upstream applies (or stands aside
because upstream fixed the problem) and passes its self-test; 1 otherwise: a patch refused (code no
tested release has: a trainer process stops at its import), a setting invalid, or a patch forced onto code
no tested release has (`--accept-forced` accepts that).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import sys
import sysconfig
import time

from . import _wrap, engine, matrix
from ._console import results_only_on_stdout

PACKAGES = ("torch", "torchvision", "torchaudio", "transformers", "datasets", "trl", "llamafactory", "unsloth", "unsloth_zoo")


def autoenable() -> dict:
    """Is VLPATCH auto-enable installed, switched on, and did it run in this interpreter?"""
    pth = [
        os.path.join(d, "vlpatch_autoenable.pth")
        for d in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *sys.path}
        if d and os.path.isfile(os.path.join(d, "vlpatch_autoenable.pth"))
    ]
    value = os.environ.get("VLPATCH", "")
    return {
        "VLPATCH": value or None,
        "pth_installed": bool(pth),
        "active": "vlpatch._bootstrap" in sys.modules,
        "refusing": engine.refusing(),  # VLPATCH=1 with invalid settings: trainer imports stop
        "pth": sorted(set(pth)),
    }


def _import_hook(hook: str) -> str | None:
    try:
        importlib.import_module(hook)
        return None
    except Exception as exc:  # an upstream that does not import here is reported, not fatal
        return f"{type(exc).__name__}: {exc}"


def _current(target):
    import wrapt

    _, _, obj = wrapt.resolve_path(importlib.import_module(target.module), target.symbol)
    return obj


def _original(target):
    obj = _current(target)
    return obj.__wrapped__ if isinstance(obj, _wrap.Patched) else obj


def drift(spec, version: str) -> dict:
    """Per target: the source fingerprint found here vs that of the tested release whose code this is (the
    release itself, or one with identical code), else of the nearest tested release below it."""
    found = {}
    for target in spec.targets_for(version):
        try:
            found[target.key] = engine.fingerprint(_original(target))
        except Exception as exc:
            found[target.key] = f"missing ({type(exc).__name__})"
    against = spec.vouching(found, version) or engine.nearest_tested(spec, version)
    known = spec.fingerprints.get(against, {}) if against else {}
    return {key: {"found": fp, "expected": known.get(key), "against": against} for key, fp in found.items()}


def _selftest(spec) -> list:
    """(check, ok, detail) rows: the wrappers attach to the installed code, revert() restores the exact
    originals, re-attaching works, then the integration's own functional check if it has one."""

    rows = []
    wrapped = [t for t in spec.targets_for(engine.installed_version(spec.distribution)) if t.wrapper]
    originals = {t.key: _original(t) for t in wrapped}
    ok = all(isinstance(_current(t), _wrap.Patched) and _current(t).__wrapped__ is originals[t.key] for t in wrapped)
    rows.append(("wrapped", ok, f"{len(wrapped)} target(s) wrap upstream's own objects"))
    engine.revert()
    ok = all(_current(t) is originals[t.key] for t in wrapped)
    rows.append(("revert", ok, "revert() put back the very same objects" if ok else "an original was not restored"))
    with engine.reading_states():  # as report() applied it: the VLPATCH_* environment
        engine.apply()
    ok = all(isinstance(_current(t), _wrap.Patched) for t in wrapped)
    rows.append(("re-apply", ok, "apply() after revert() attached again"))
    try:
        integration = importlib.import_module(spec.integration)
        check = getattr(integration, "selftest", None)
        if check is not None:
            t = time.perf_counter()
            ok, detail = check(spec)
            rows.append(("functional", ok, f"{detail} ({time.perf_counter() - t:.1f}s)"))
    except Exception as exc:
        rows.append(("functional", False, f"{type(exc).__name__}: {exc}"))
    return rows


def report(distributions=None, selftest: bool = True, accept_forced: bool = False) -> dict:
    """Everything `vlpatch doctor` prints, as data (the canary uses it too)."""
    from packaging.version import Version

    from .settings import SettingsError

    out = {
        "python": sys.version.split()[0],
        "versions": {p: engine.installed_version(p) for p in PACKAGES},
        "autoenable": autoenable(),
        "patches": [],
        "import_errors": {},
        "settings": [],
        "accept_forced": accept_forced,
    }
    specs = [s for s in matrix.load().patches if distributions is None or s.distribution in distributions]
    for d in sorted({s.distribution for s in specs}):
        out["versions"].setdefault(d, engine.installed_version(d))
    try:
        with engine.reading_states():  # a refused patch is a problem to report, not an import to stop
            engine.apply()
    except SettingsError as exc:  # nothing is patched: say which setting, and check nothing else
        out["settings"] = exc.problems
        out["patches"] = [
            {"id": s.id, "state": "not applied", "reason": "the settings are invalid", "distribution": s.distribution,
             "installed": engine.installed_version(s.distribution)}
            for s in specs
        ]
        out["problems"] = problems(out)
        return out
    def _absent(spec) -> bool:  # the installed release has no code for this patch (`absent`): its hook is not needed
        version = engine.installed_version(spec.distribution)
        return bool(version) and spec.absent is not None and Version(version) in spec.absent

    with engine.reading_states():
        for hook in sorted({s.hook for s in specs if engine.installed_version(s.distribution) and not _absent(s)}):
            err = _import_hook(hook)
            if err:
                out["import_errors"][hook] = err
    states = {row["id"]: row for row in engine.status()}
    for spec in specs:
        version = engine.installed_version(spec.distribution)
        row = {
            **states.get(spec.id, {"id": spec.id, "state": "disabled", "reason": ""}),
            "distribution": spec.distribution,
            "installed": version,
            "applies": str(spec.applies),
            "tested": list(spec.tested),
            "in_applies": bool(version) and Version(version) in spec.applies,
        }
        if version and spec.hook not in out["import_errors"] and not _absent(spec):  # absent: no code to compare
            row["drift"] = drift(spec, version)
        if selftest and row["state"] == "applied":
            row["selftest"] = [{"check": c, "ok": ok, "detail": d} for c, ok, d in _selftest(spec)]
        out["patches"].append(row)
    out["problems"] = problems(out)
    return out


def problems(data: dict) -> list:
    """What the user enabled but cannot have: a patch for an installed upstream that is skipped (other
    than because a sibling patch covers that release), a hook that does not import, a failed self-test."""
    found = [f"invalid setting: {problem}" for problem in data.get("settings", [])]
    found += [f"cannot import {hook}: {err}" for hook, err in data["import_errors"].items()]
    for row in data["patches"]:
        if not row.get("installed") or row["state"] in ("disabled", "excluded", "not applied"):
            continue
        if row["state"] == "applied" and row["reason"].startswith("forced") and not data.get("accept_forced"):
            found.append(
                f"{row['id']}: FORCED onto {row['distribution']} {row['installed']}, which the matrix does not list "
                f"(tested: {', '.join(row['tested'])}); `vlpatch doctor --accept-forced` accepts that"
            )
        if row["state"] == "refused":
            found.append(f"{row['id']}: REFUSED, a trainer process with VLPATCH=1 or apply() stops at its import: {row['reason']}")
        if row["state"] == "skipped" and "covers it" not in row["reason"]:
            found.append(f"{row['id']}: {row['reason']}")
        for check in row.get("selftest", []):
            if not check["ok"]:
                found.append(f"{row['id']}: self-test {check['check']} failed: {check['detail']}")
    return found


def render(data: dict) -> str:
    lines = [f"vlpatch doctor (python {data['python']})", "", "installed:"]
    for name, version in data["versions"].items():
        lines.append(f"  {name:13} {version or '-'}")
    a = data["autoenable"]
    lines += [
        "",
        "auto-enable: "
        + ("REFUSING in this interpreter (invalid settings: a trainer import stops)" if a.get("refusing")
           else "active in this interpreter" if a["active"] else "not active in this interpreter")
        + f" (VLPATCH={a['VLPATCH'] or 'unset'}; vlpatch_autoenable.pth {'installed' if a['pth_installed'] else 'MISSING'})",
        "",
        "patches:",
    ]
    for row in data["patches"]:
        lines.append(f"  {row['id']}: {row['state']} ({row.get('installed') or 'not installed'}) - {row['reason']}")
        for name, state in (row.get("parts") or {}).items():
            lines.append(f"    part {name}: {state}")
        drifted = [k for k, d in (row.get("drift") or {}).items() if d["expected"] and d["found"] != d["expected"]]
        if row.get("drift"):
            against = next(iter(row["drift"].values()))["against"]
            lines.append(
                f"    fingerprints vs {against}: "
                + (f"DRIFTED: {', '.join(k.split(':')[1] for k in drifted)}" if drifted else f"{len(row['drift'])} target(s) match")
            )
        for check in row.get("selftest", []):
            lines.append(f"    self-test {check['check']}: {'ok' if check['ok'] else 'FAILED'} - {check['detail']}")
    for hook, err in data["import_errors"].items():
        lines.append(f"  could not import {hook}: {err}")
    lines.append("")
    if data["problems"]:
        lines.append("problems:")
        lines += [f"  - {p}" for p in data["problems"]]
    else:
        lines.append("no problems: every patch meant for an installed upstream applies or stands aside")
    forced = [r["id"] for r in data["patches"] if r["state"] == "applied" and r["reason"].startswith("forced")]
    if forced and data.get("accept_forced"):
        lines.append(f"accepted (--accept-forced): {', '.join(forced)} forced onto untested versions")
    return "\n".join(lines)


def main(args) -> int:
    with results_only_on_stdout():  # the table says it all
        data = report(selftest=not args.no_selftest, accept_forced=args.accept_forced)
    print(json.dumps(data, indent=2, default=str) if args.json else render(data))
    return 1 if data["problems"] else 0
