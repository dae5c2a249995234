"""Imported by vlpatch_autoenable.pth at interpreter start, only when VLPATCH is set to a true value."""

try:
    from .engine import apply as _apply

    _apply()
except Exception as _exc:  # never break the interpreter start-up of the user's process
    import sys as _sys

    print(f"vlpatch: auto-enable (VLPATCH) failed: {_exc!r}", file=_sys.stderr)
