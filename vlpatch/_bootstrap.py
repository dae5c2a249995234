"""Imported by vlpatch_autoenable.pth at interpreter start, only when VLPATCH is set to a true value.

Never breaks the interpreter start-up. With invalid settings nothing is patched, a warning names each
bad setting, and a process that then imports a trainer module vlpatch patches stops at that import
(`engine.refuse`): a typo must not let training run unprotected, while pip, editors and linters keep
working so the mistake can be fixed.
"""

try:
    from . import engine as _engine
    from .settings import SettingsError as _SettingsError

    try:
        _engine.apply()
    except _SettingsError as _exc:
        import sys as _sys

        _hooks = _engine.refuse(_exc)
        print(
            f"{_exc}\nvlpatch: VLPATCH is set but nothing is patched; this process stops if it imports "
            f"{', '.join(_hooks)} (fix the setting, or unset VLPATCH)",
            file=_sys.stderr,
        )
except Exception as _exc:  # never break the interpreter start-up of the user's process
    import sys as _sys

    _where = ""
    try:  # and never let a trainer run unprotected because of it: its import stops, naming the failure
        from . import engine as _engine

        _where = "; this process stops if it imports " + ", ".join(_engine.refuse(_exc))
    except Exception:
        pass
    print(f"vlpatch: auto-enable (VLPATCH) failed: {_exc!r}{_where}", file=_sys.stderr)
