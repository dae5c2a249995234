"""Output hygiene for the commands that run upstream code (`vlpatch doctor`, `vlpatch scan`)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys


@contextlib.contextmanager
def results_only_on_stdout():
    """While upstream code runs, its stdout logging goes to stderr (file descriptor level: handlers
    bound to sys.stdout at import too) and vlpatch's own warnings are quiet: the command prints its
    result on stdout afterwards."""
    vlogger = logging.getLogger("vlpatch")
    level = vlogger.level
    vlogger.setLevel(logging.ERROR)
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        vlogger.setLevel(level)


@contextlib.contextmanager
def upstream_output(verbose: bool = False):
    """Upstream's own output while a command runs its code: with `verbose`, on stderr (stdout too goes
    to stderr, so the result alone is on stdout); else into a log file, kept only if the command fails.

    Yields (console, log): a stream on the real stderr (for a progress bar) and the log file's path
    (None when verbose). File-descriptor level, so handlers bound to either stream at import follow."""
    if verbose:
        with results_only_on_stdout():
            yield sys.stderr, None
        return
    import tempfile

    fd, log = tempfile.mkstemp(prefix="vlpatch-upstream-", suffix=".log")
    vlogger = logging.getLogger("vlpatch")
    level = vlogger.level
    vlogger.setLevel(logging.ERROR)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    console = os.fdopen(os.dup(saved[1]), "w", buffering=1)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    failed = True
    try:
        yield console, log
        failed = False
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (*saved, fd):
            os.close(f)
        console.close()
        vlogger.setLevel(level)
        if not failed:
            os.unlink(log)
