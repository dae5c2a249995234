"""The one report writer every patch calls.

Each affected sample (text truncated, media dropped, sample dropped) becomes one JSON line in the
report file, appended with a single `os.write` on an `O_APPEND` descriptor so that rows from several
worker processes never interleave. Per-process tallies (kept / truncated / dropped ...) go to small
files in a run directory so that the process that started the work can log one summary covering
every worker, forked or spawned.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

logger = logging.getLogger("vlpatch")

ACTIONS = ("kept", "truncated", "shrunk", "media_dropped", "dropped")
_RUN_ENV = "VLPATCH_RUN"


@dataclass
class ReportRun:
    """One unit of work (LLaMA-Factory: one dataset split being preprocessed)."""

    trainer: str
    label: str = ""
    report_path: str | None = None
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    stats_dir: str = ""
    meta: dict = field(default_factory=dict)  # copied into every row (dataset, split, stage ...)
    reasons: Counter = field(default_factory=Counter)  # summed by end_run: each reason code, how often

    def to_env(self) -> str:  # what worker processes need of the run (not its sums)
        return json.dumps({f: getattr(self, f) for f in self.__dataclass_fields__ if f != "reasons"})

    @classmethod
    def from_env(cls) -> "ReportRun | None":
        raw = os.environ.get(_RUN_ENV)
        if not raw:
            return None
        if _parsed[0] == raw:  # the same run, asked again (every sample a dataset processor encodes)
            return _parsed[1]
        try:
            run = cls(**json.loads(raw))
        except (TypeError, ValueError):
            return None
        _parsed[:] = [raw, run]
        return run


_current: ReportRun | None = None
_parsed: list = [None, None]  # [the last VLPATCH_RUN value read, its ReportRun]
_local_counts: Counter = Counter()  # tallies made outside a run (a collator): summed up at exit
_local_reasons: Counter = Counter()
_exit_summary_registered = False
_last_path: str | None = None


def start_run(trainer: str, label: str, report_path: str | None, tallies: bool = True, **meta) -> ReportRun:
    """Begin a run in this process; worker processes (forked or spawned) find it through the env.
    `tallies=False`: no summary counts are gathered (`vlpatch scan`, which reads each sample's rows)."""
    global _current
    run = ReportRun(trainer, label, report_path, stats_dir=tempfile.mkdtemp(prefix="vlpatch-") if tallies else "", meta=meta)
    _current = run
    os.environ[_RUN_ENV] = run.to_env()
    return run


def current_run() -> ReportRun | None:
    global _current
    env_run = ReportRun.from_env()
    if env_run is not None and (_current is None or _current.run_id != env_run.run_id):
        _current = env_run
    return _current


def end_run(run: ReportRun, quiet: bool = False) -> Counter:
    """Collect every process's tallies, log the summary, clean up. Returns the counts (the reasons
    are left on `run.reasons`)."""
    global _current
    counts: Counter = Counter()
    reasons: Counter = Counter()
    seen = False
    if run.stats_dir and os.path.isdir(run.stats_dir):
        for name in os.listdir(run.stats_dir):
            with open(os.path.join(run.stats_dir, name), encoding="utf-8") as fh:
                for line in fh:
                    seen = True
                    row = json.loads(line)
                    counts.update(row.get("counts", {}))
                    reasons.update(row.get("reasons", {}))
        shutil.rmtree(run.stats_dir, ignore_errors=True)
    run.reasons = reasons
    if os.environ.get(_RUN_ENV) == run.to_env():
        del os.environ[_RUN_ENV]
    if _current is run or (_current is not None and _current.run_id == run.run_id):
        _current = None
    if not run.stats_dir:  # started without tallies: nothing to sum up
        return counts
    if not seen:
        (logger.info if quiet else logger.warning)(
            "vlpatch [%s %s]: no sample went through the patch in this run (results reused from a cache?); "
            "set overwrite_cache: true to get a complete report",
            run.trainer,
            run.label,
        )
        return counts
    logger.warning("vlpatch [%s %s]: %s", run.trainer, run.label, format_summary(counts, reasons, run.report_path))
    return counts


def resized_row(key: tuple, before, after, runs_before, runs_after) -> dict:
    """One entry of a report row's `media_resized`: item `key` ((kind, index)) downsized by policy
    shrink from `before` to `after` ((width, height[, frames])), with its tokens in the runs before
    and after (`core.Run`s)."""
    kind, k = key
    row = {"item": f"{kind}#{k}", "before": list(before[:2]), "after": list(after[:2]),
           "tokens_before": sum(r.length for r in runs_before if key in r.keys()),
           "tokens_after": sum(r.length for r in runs_after if key in r.keys())}
    if kind == "video":
        row.update(frames_before=before[2], frames_after=after[2])
    return row


def format_summary(counts: Counter, reasons: Counter, report_path: str | None) -> str:
    parts = [f"{counts.get(a, 0)} {a}" for a in ACTIONS if a != "shrunk" or counts.get(a)]  # shrunk: policy shrink only
    text = "samples: " + ", ".join(parts)
    if reasons:
        text += "; reasons: " + ", ".join(f"{r} x{n}" for r, n in reasons.most_common())
    affected = sum(counts.get(a, 0) for a in ACTIONS if a != "kept")
    if affected:
        text += f"; one row per affected sample in {report_path}" if report_path else "; no report file set"
    return text


def tally(counts: Counter, reasons: Counter) -> None:
    """Record one batch's counts for the current run (or this process, when there is no run)."""
    run = current_run()
    if run is not None and run.stats_dir:
        line = json.dumps({"pid": os.getpid(), "counts": dict(counts), "reasons": dict(reasons)}) + "\n"
        try:
            _append(os.path.join(run.stats_dir, f"{os.getpid()}.jsonl"), line)
            return
        except OSError:  # the run directory is gone (a stale environment): count locally
            pass
    global _exit_summary_registered
    _local_counts.update(counts)
    _local_reasons.update(reasons)
    if not _exit_summary_registered:
        _exit_summary_registered = True
        atexit.register(_exit_summary)


def _exit_summary() -> None:
    affected = sum(n for a, n in _local_counts.items() if a != "kept")
    if affected:
        text = format_summary(_local_counts, _local_reasons, os.environ.get("VLPATCH_REPORT") or _last_path)
        logger.warning("vlpatch (process %d): %s", os.getpid(), text)


def write_row(row: dict) -> None:
    """Append one affected sample's row to the report."""
    write_rows([row])


def write_rows(rows: list, default_path: str | None = None) -> None:
    """Append rows (one per affected sample) with a single write; log them where no report is set.

    The file: the run's report path, else $VLPATCH_REPORT, else `default_path`.
    """
    if not rows:
        return
    run = current_run()
    base = {"run_id": run.run_id, "trainer": run.trainer, **run.meta} if run is not None else {}
    stamp = {"time": round(time.time(), 3), "pid": os.getpid()}
    rows = [{**base, **stamp, **row} for row in rows]
    path = (run.report_path if run is not None else None) or os.environ.get("VLPATCH_REPORT") or default_path
    if path:
        global _last_path
        _last_path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        _append(path, "".join(_ROW_JSON.encode(r) + "\n" for r in rows))
    else:
        for row in rows:
            logger.warning("vlpatch: %s (set VLPATCH_REPORT to keep a report file)", row)


_ROW_JSON = json.JSONEncoder(ensure_ascii=False, default=str)  # json.dumps(row, ensure_ascii=False, default=str), made once


def _append(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, text.encode("utf-8"))
    finally:
        os.close(fd)


def run_rows(run: ReportRun, limit: int | None = None, where=None) -> list[dict]:
    """The rows this run wrote (read back from its report file), those `where` accepts, at most `limit`."""
    out = []
    if not run.report_path or not os.path.exists(run.report_path):
        return out
    with open(run.report_path, encoding="utf-8") as fh:
        for line in fh:
            if run.run_id not in line:
                continue
            row = json.loads(line)
            if row.get("run_id") == run.run_id and (where is None or where(row)):
                out.append(row)
                if limit is not None and len(out) >= limit:
                    break
    return out


def read_report(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
