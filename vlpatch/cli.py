"""The `vlpatch` command line."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from . import __version__, engine, matrix
from .errors import POLICY_NAMES
from .settings import SettingsError, check_ids


def _settings_error(exc) -> int:
    print(str(exc), file=sys.stderr)
    return 2


def _status(args) -> int:
    try:
        engine.apply()
    except SettingsError as exc:
        return _settings_error(exc)
    for spec in matrix.load().patches:  # attach now: import the hook module if it is installed
        if engine.installed_version(spec.distribution) is not None and args.import_targets:
            try:
                importlib.import_module(spec.hook)
            except Exception as exc:  # an upstream that fails to import is reported, not fatal
                print(f"# could not import {spec.hook}: {exc!r}", file=sys.stderr)
    rows = engine.status()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        print(f"{row['id']}: {row['state']} ({row.get('version') or _installed(row['id'])}) - {row['reason']}")
        for name, state in (row.get("parts") or {}).items():
            print(f"  part {name}: {state}")
        for key in ("covered_plugins", "uncovered_plugins", "covered_processors"):
            if row.get(key):
                print(f"  {key.replace('_', ' ')}: {', '.join(row[key])}")
    return 0


def _installed(patch_id: str) -> str:
    spec = matrix.load().by_id(patch_id)
    version = engine.installed_version(spec.distribution)
    return version or f"{spec.distribution} not installed"


def _fingerprint(args) -> int:
    """Print the fingerprints of the installed release's targets, as the lock holds them for its release."""
    import wrapt

    known = [spec.id for spec in matrix.load().patches]
    problems = check_ids("vlpatch fingerprint ID", args.patch, known)
    if problems:
        return _settings_error(SettingsError(problems))
    for spec in matrix.load().patches:
        if args.patch and spec.id not in args.patch:
            continue
        version = engine.installed_version(spec.distribution)
        if version is None:
            print(f"# {spec.id}: {spec.distribution} not installed", file=sys.stderr)
            continue
        if not args.patch and version not in spec.applies:  # named patches are printed whatever the version
            continue
        lines = []
        for target in spec.targets_for(version):
            try:
                _, _, original = wrapt.resolve_path(importlib.import_module(target.module), target.symbol)
                lines.append(f'        "{target.key}": {engine.fingerprint(original)}')
            except Exception as exc:
                print(f"# {spec.id}: cannot read {target.key}: {exc!r}", file=sys.stderr)
                return 1
        print(f"# {spec.id}: fingerprints for {spec.distribution} {version}")
        print(f'      "{version}":')
        print("\n".join(lines))
    return 0


def coverage_markdown() -> str:
    """The README's coverage table, from the matrix: each LLaMA-Factory mm plugin, the media kinds it
    writes, the tested releases that have it, and the processor its tests use."""
    spec = matrix.load().by_id("llamafactory.truncation")
    tested = spec.tested
    lines = ["| plugin | media kinds | LLaMA-Factory releases | processor in the tests |", "|---|---|---|---|"]
    for name, row in sorted(spec.options["coverage"].items()):
        since = tested.index(row["since"]) if row["since"] in tested else 0
        releases = tested[since:]
        span = releases[0] if len(releases) == 1 else f"{releases[0]} - {releases[-1]}"
        kinds = ", ".join(row["kinds"]) or "text only"
        proc = {"real": "real (transformers)", "stand-in": "stand-in (remote code on the hub)", "none": "-"}[row["processor"]]
        lines.append(f"| `{name}` | {kinds} | {span} | {proc} |")
    return "\n".join(lines)


def releases_markdown() -> str:
    """The README's release table, from the matrix and its lock: per patch, the releases in its range that
    are protected (their code equals a tested release's) out of all, and each code shape with the tested
    release that vouches for it."""
    lines = ["| patch | upstream | protected / releases in range | code shapes: releases (tested representative) |", "|---|---|---|---|"]
    for spec in matrix.load().patches:
        if not spec.shapes:
            continue
        total = sum(len(s.releases) for s in spec.shapes)
        covered = [s for s in spec.shapes if any(v in spec.tested for v in s.releases)]
        shapes = "; ".join(
            f"{s.releases[0]}" + (f" - {s.releases[-1]}" if len(s.releases) > 1 else "")
            + f" ({next((v for v in spec.tested if v in s.releases), 'NOT TESTED')})"
            for s in spec.shapes
        )
        lines.append(f"| `{spec.id}` | {spec.distribution} `{spec.applies}` | {sum(len(s.releases) for s in covered)} / {total} | {shapes} |")
    return "\n".join(lines)


def _releases(args) -> int:
    print(releases_markdown())
    return 0


def _coverage(args) -> int:
    print(coverage_markdown())
    return 0


def _doctor(args) -> int:
    from . import doctor

    return doctor.main(args)


def _scan(args) -> int:
    from . import scan

    return scan.main(args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vlpatch", description="vision-preserving patches for VL fine-tuning")
    parser.add_argument("--version", action="version", version=f"vlpatch {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("status", help="which patch applies to the installed upstream versions, and why")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-import", dest="import_targets", action="store_false", help="do not import upstream")
    p.set_defaults(func=_status)
    p = sub.add_parser("fingerprint", help="source fingerprints of the installed targets (what compat_lock.json holds for the release)")
    p.add_argument("patch", nargs="*", help="patch ids (default: all)")
    p.set_defaults(func=_fingerprint)
    p = sub.add_parser("coverage", help="which LLaMA-Factory mm plugins and media kinds the tests prove (markdown)")
    p.set_defaults(func=_coverage)
    p = sub.add_parser("releases", help="upstream releases protected, by code shape, from the matrix's lock (markdown)")
    p.set_defaults(func=_releases)
    p = sub.add_parser("doctor", help="installed versions, each patch's state and why, a quick self-test")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-selftest", action="store_true", help="skip the self-test")
    p.add_argument("--accept-forced", action="store_true", help="a patch forced onto an untested version (VLPATCH_FORCE) is not a problem")
    p.set_defaults(func=_doctor)
    p = sub.add_parser("scan", help="what LLaMA-Factory would do with each sample, before training")
    p.add_argument("config", nargs="?", help="a LLaMA-Factory training YAML (options below override it)")
    p.add_argument("--dataset", help="dataset name(s) in dataset_dir/dataset_info.json")
    p.add_argument("--dataset-file", help="a .json / .jsonl dataset file without dataset_info.json (columns guessed)")
    p.add_argument("--dataset-dir"); p.add_argument("--media-dir")
    p.add_argument("--template"); p.add_argument("--model", help="model_name_or_path (tokenizer and processor only)")
    p.add_argument("--cutoff-len", type=int); p.add_argument("--image-max-pixels", type=int); p.add_argument("--image-min-pixels", type=int)
    p.add_argument("--policy", choices=sorted(POLICY_NAMES), help="default: VLPATCH_POLICY, else drop (what training would use)")
    p.add_argument("--verbose", action="store_true", help="show upstream's own log (quiet by default)")
    p.add_argument("--json", action="store_true", help="per-sample results as JSON on stdout")
    p.add_argument("--csv", help="write per-sample results to this CSV file")
    p.add_argument("--limit", type=int, help="scan the first N samples only")
    p.add_argument("--workers", type=int, help="processes (default: the config's preprocessing_num_workers, else 1)")
    p.add_argument("--plot", metavar="FILE.png", help="draw the token histogram with the cutoff and the outcomes")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_scan)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
