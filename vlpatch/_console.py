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
