"""Post-import hooks that cost nothing at start-up.

The shape is wrapt's `register_post_import_hook` (a meta path finder that wraps the loader of a named
module and calls the hooks once the module has executed), written out here because `import wrapt`
costs a start-up budget vlpatch does not have: with `VLPATCH=1` every Python process of the
environment (pip, pytest, every script) runs `apply()`, and wrapt's package import pulls in asyncio.
wrapt itself is imported only when a patch attaches (`vlpatch._wrap`), after the trainer's import.

Hooks run after the module's code, in registration order, with the module; an exception in a hook
propagates into the import (the engine's own hooks catch theirs, except the deliberate refusal of
`engine.refuse`). A module imported again after it was removed from `sys.modules` runs its hooks again.
"""

from __future__ import annotations

import sys

_hooks: dict = {}  # module name -> [hook, ...]


def when_imported(name: str, hook) -> None:
    """Call `hook(module)` when `name` is imported (the caller handles a module already imported)."""
    _hooks.setdefault(name, []).append(hook)
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def installed(distribution: str) -> bool:
    """Whether a distribution is installed (a `.dist-info` / `.egg-info` on sys.path), without
    importlib.metadata (whose import alone costs more than vlpatch's start-up budget)."""
    return _normal(distribution) in _distributions()


def _normal(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


_seen: dict = {}


def _distributions() -> set:
    key = tuple(sys.path)
    if key not in _seen:
        import os

        names = set()
        for entry in key:
            try:
                items = os.listdir(entry or ".")
            except OSError:  # a zip file, a missing directory
                continue
            for item in items:
                for suffix in (".dist-info", ".egg-info"):
                    if item.endswith(suffix):
                        names.add(_normal(item[: -len(suffix)].split("-", 1)[0]))
        _seen.clear()
        _seen[key] = names
    return _seen[key]


class _Finder:
    """Finds nothing itself: for a hooked module it asks the other finders and wraps the loader."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _hooks:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _Loader(spec.loader)
        return spec


class _Loader:
    """Delegates to the real loader, then runs the hooks. The module keeps the real loader."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module):
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.loader is self:
            spec.loader = self._loader
        if getattr(module, "__loader__", None) is self:
            module.__loader__ = self._loader
        self._loader.exec_module(module)
        for hook in list(_hooks.get(module.__name__, ())):
            hook(module)

    def __getattr__(self, name):  # get_source, get_filename, is_package ...: the real loader's
        return getattr(self._loader, name)
