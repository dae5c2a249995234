"""compat_matrix.yaml, read once: which patch applies to which upstream version, and what it targets.

Two readings. `index()` is what `apply()` needs at start-up (each patch's id, distribution and hook
module), read from the shipped file's lines without PyYAML or packaging (tests/test_matrix.py checks
it equals the full parse). `load()` is the whole matrix (targets, fingerprints, options, version
specifiers), parsed when a hook module is imported, where its cost does not count.
"""

from __future__ import annotations

import os

MATRIX_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compat_matrix.yaml")


class Entry(tuple):
    """(id, distribution, hook) of one patch, in matrix order."""

    __slots__ = ()
    id = property(lambda self: self[0])
    distribution = property(lambda self: self[1])
    hook = property(lambda self: self[2])


def index(path: str | None = None) -> list:
    """The patches' (id, distribution, hook), cheaply: the shipped matrix's lines are read as written
    (`  - id:` opens a patch, its `    distribution:` / `    hook:` keys follow); another matrix file
    (VLPATCH_MATRIX, for vlpatch's own tests) is parsed whole."""
    path = path or os.environ.get("VLPATCH_MATRIX") or MATRIX_PATH
    if os.path.abspath(path) != MATRIX_PATH:
        return [Entry((p.id, p.distribution, p.hook)) for p in _load(path).patches]
    return _index(path)


_indexes: dict = {}
_loaded: dict = {}


def _index(path: str) -> list:
    if path in _indexes:
        return _indexes[path]
    out, current = [], None
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("  - id:"):
                current = {"id": _scalar(line)}
                out.append(current)
            elif current is not None and line.startswith(("    distribution:", "    hook:")):
                current[line.split(":", 1)[0].strip()] = _scalar(line)
            elif line[:1].isalpha() and not line.startswith("patches:"):
                current = None  # the next top-level key (smoke:) ends the patches
    _indexes[path] = [Entry((p["id"], p["distribution"], p["hook"])) for p in out]
    return _indexes[path]


def _scalar(line: str) -> str:
    return line.split(":", 1)[1].split(" #", 1)[0].strip().strip("'\"")


def load(path: str | None = None):
    """The matrix shipped with vlpatch (or the file named by VLPATCH_MATRIX, for vlpatch's own tests)."""
    return _load(path or os.environ.get("VLPATCH_MATRIX") or MATRIX_PATH)


def _load(path: str):
    if path not in _loaded:
        import yaml

        from ._matrix_spec import parse

        with open(path, encoding="utf-8") as fh:
            _loaded[path] = parse(yaml.load(fh, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))
    return _loaded[path]
