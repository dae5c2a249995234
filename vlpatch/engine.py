"""The patching engine: reads the matrix, attaches patches when their upstream module is imported.

Shape borrowed from OpenTelemetry instrumentors and ddtrace's registry: each patch is data in
`compat_matrix.yaml` (distribution, version specifier, targets, source fingerprints per tested
version); the integration module named there only supplies the wrappers. A patch attaches through a
post-import hook on its `hook` module (`vlpatch._hooks`, wrapt's shape; at once if that module is
already imported), checks the
installed version's range and the source fingerprint of every target against those of the releases it was
tested on (the lock, compat_lock.json: the same code is protected whatever its version number), and then
wraps all targets or none; where a patch that protects cannot attach, the trainer's import stops rather
than run unprotected.
`revert()` puts back the exact original objects. Nothing here imports torch, transformers or a trainer.
"""

from __future__ import annotations

import os
import sys
from _thread import RLock

from . import _hooks
from . import matrix as _matrix
from . import settings as _settings
from .errors import UnknownUpstreamError, VLPatchError

# Start-up cost: with VLPATCH=1 every Python process of the environment runs apply(), so this module
# imports only the above. wrapt (vlpatch._wrap), PyYAML and packaging (the whole matrix),
# importlib.metadata, logging, inspect: when a hook module is imported, or when they are asked for.


class _Logger:
    """logging.getLogger("vlpatch"), imported on first use."""

    @staticmethod
    def _real():
        import logging

        return logging.getLogger("vlpatch")

    def __getattr__(self, name):
        return getattr(self._real(), name)

    def __setattr__(self, name, value):
        setattr(self._real(), name, value)


logger = _Logger()


class Config:
    """The settings of this process: one attribute per `field` of the settings table (vlpatch/settings.py),
    and `sources`: field -> where its value came from ("VLPATCH_EXCLUDE", "apply(exclude=...)")."""

    def __init__(self, **values):
        for name, setting in _settings.FIELDS.items():
            setattr(self, name, values.pop(name, setting.default))
        if values:
            raise TypeError(f"Config() got unknown settings {sorted(values)}")
        self.sources: dict = {}

    @classmethod
    def from_env(cls, env=None, **overrides) -> "Config":
        """The settings of this process: the VLPATCH_* environment, then apply()'s arguments over it.

        Every value is validated (`vlpatch.settings`): one SettingsError lists every bad one, naming the
        setting, the value, the valid values and the closest match. Nothing is guessed or ignored."""
        env = os.environ if env is None else env
        problems = _settings.check_env(env, _known_ids)
        cfg = cls()
        for name, setting in _settings.FIELDS.items():
            raw = env.get(setting.name, "").strip()
            if raw:
                value = _settings.parse(setting, raw)
                if value is not None:  # else the check above reported it
                    setattr(cfg, name, value)
                cfg.sources[name] = setting.name
        for key, value in overrides.items():
            if value is None:
                continue
            setting, source = _settings.FIELDS[key], f"apply({key}=...)"
            if setting.kind == "ids":
                value = [value] if isinstance(value, str) else value
                try:
                    value = frozenset(value)
                except TypeError:
                    problems.append(f"{source}: {value!r} is not a list of patch ids")
                    continue
                problems += _settings.check_ids(source, sorted(value, key=str), _known_ids())
            elif setting.kind == "switch":
                if not isinstance(value, bool):
                    problems.append(f"{source}: {value!r} is not True or False")
                    continue
            else:
                problem = _settings.CHECKS[setting.kind](source, value)
                if problem:
                    problems.append(problem)
                    continue
                value = _settings.parse(setting, value)
            setattr(cfg, key, value)
            cfg.sources[key] = source
        if problems:
            raise _settings.SettingsError(problems)
        return cfg

    def selects(self, patch_id: str) -> bool:
        return self.why_not(patch_id) is None

    def why_not(self, patch_id: str) -> str | None:
        """None when the patch is enabled; else why the user left it off, naming the setting."""
        if patch_id in self.exclude:
            return f"excluded by you ({self.sources.get('exclude', 'VLPATCH_EXCLUDE')})"
        if self.patches is not None and patch_id not in self.patches:
            return f"excluded by you (not in {self.sources.get('patches', 'VLPATCH_PATCHES')})"
        return None


def _known_ids() -> list:
    """Patch ids of the matrix in use (the shipped one if VLPATCH_MATRIX cannot be read: that is reported apart)."""
    return [e.id for e in _entries()]


def _entries() -> list:
    """(id, distribution, hook) per patch: the matrix in use, else the shipped one (a bad VLPATCH_MATRIX
    is reported by the settings check)."""
    try:
        return _matrix.index()
    except OSError:
        return _matrix.index(_matrix.MATRIX_PATH)


class PatchState:
    def __init__(self, id: str, state: str, reason: str = "", version: str | None = None, details: dict | None = None):
        self.id = id
        self.state = state  # pending | applied | native | skipped | refused | excluded | disabled | reverted
        self.reason = reason
        self.version = version
        self.details = details or {}

    def as_dict(self) -> dict:
        return {"id": self.id, "state": self.state, "reason": self.reason, "version": self.version, **self.details}


_lock = RLock()
_enabled = False
_config = Config()
_hooked: set = set()  # hook modules with a registered post-import hook (registered once per process)
_applied: dict = {}  # patch id -> list of (parent, attribute, original, had_own)
_states: dict = {}


def config() -> Config:
    return _config


_fingerprints: dict = {}  # id(obj) -> (obj, fingerprint): an object's source does not change in a process


def fingerprint(obj) -> str:
    """sha256 of a function's dedented source, trailing blanks ignored: what the patch was written for
    (remembered per object: `vlpatch scan` applies its passes' patches again and again)."""
    import inspect

    hit = _fingerprints.get(id(obj))
    if hit is None or hit[0] is not obj:
        hit = _fingerprints[id(obj)] = (obj, fingerprint_source(inspect.getsource(obj)))
    return hit[1]


def fingerprint_source(source: str) -> str:
    """`fingerprint` of a function's source text (scripts/lock.py reads it from a wheel, importing nothing)."""
    import hashlib
    import textwrap

    norm = "\n".join(line.rstrip() for line in textwrap.dedent(source).strip().splitlines())
    return hashlib.sha256(norm.encode("utf-8")).hexdigest()[:16]


def installed_version(distribution: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def apply(
    policy: str | None = None,
    *,
    patches=None,
    exclude=None,
    force: bool | None = None,
    media_first: bool | None = None,
    report: str | None = None,
    max_bad=None,
    shrink_min_pixels=None,
    shrink_min_frames=None,
    shrink_fallback: str | None = None,
    shrink_dir=None,
) -> list:
    """Enable vlpatch in this process; arguments override the VLPATCH_* environment.

    Every setting is validated first: a bad one raises `vlpatch.settings.SettingsError` and nothing
    changes. Idempotent: a second call with the same settings changes nothing. A later call with other
    settings takes effect: a patch now excluded is reverted, one now selected (or now forced) attaches,
    and the policy, report and media-first switch are read by every wrapper at call time.

    Protection follows the code: a patch attaches where the installed targets' source equals that of a
    release it was tested on (the lock, `compat_lock.json`). Where a patch cannot attach (code no tested
    release has, a missing target, a release outside every range), the import of its trainer module
    stops with `UnknownUpstreamError` naming the release and the ways on (or apply() raises it, where the
    module was imported first); VLPATCH_FORCE / VLPATCH_EXCLUDE are the ways on."""
    global _enabled, _config, _refusal
    with _lock:
        new = Config.from_env(
            policy=policy, patches=patches, exclude=exclude, force=force, media_first=media_first, report=report,
            max_bad=max_bad, shrink_min_pixels=shrink_min_pixels, shrink_min_frames=shrink_min_frames,
            shrink_fallback=shrink_fallback, shrink_dir=shrink_dir,
        )
        old, was_enabled = _config, _enabled
        _config, _enabled, _refusal = new, True, None
        _publish_config()
        _configure_logging(_config.log_level)
        for spec in _entries():  # id, distribution, hook: the whole matrix is read when a hook fires
            _settle(spec, new, old, was_enabled)
        for hook in sorted({e.hook for e in _entries() if e.hook in sys.modules}):
            _stop_if_refused(hook)  # the trainer was imported before apply(): stop here, not at its import
        return status()


def _settle(spec, new: Config, old: Config, was_enabled: bool) -> None:
    """Patch `spec` under the settings `new` (`old` before this apply()): kept where applied and still
    wanted, reverted where not; excluded; or attached now, or at its hook's import."""
    st = _states.get(spec.id)
    why_not = new.why_not(spec.id)
    if spec.id in _applied:
        forced = st is not None and st.reason.startswith("forced")
        if why_not is None and not (forced and not new.force):
            return  # applied and still wanted
        _unwrap(_applied.pop(spec.id))
    elif was_enabled and why_not is None and old.force == new.force and st is not None and st.state in ("pending", "skipped", "native", "refused"):
        return  # decided under the same settings: not again (no second warning)
    if why_not is not None:
        _states[spec.id] = PatchState(spec.id, "excluded", why_not)
        return
    if not _hooks.installed(spec.distribution):
        _states[spec.id] = PatchState(spec.id, "skipped", f"{spec.distribution} is not installed")
    else:
        _states[spec.id] = PatchState(spec.id, "pending", f"waits for `import {spec.hook}`")
    if spec.hook in sys.modules:
        _attach(_matrix.load().by_id(spec.id))
    elif spec.hook not in _hooked:
        _hooked.add(spec.hook)
        _hooks.when_imported(spec.hook, _hook_for(spec.hook))


_refusal: Exception | None = None  # set by refuse(): invalid settings under VLPATCH=1
_refusal_hooked: set = set()


def refuse(error: Exception) -> list:
    """VLPATCH=1 with invalid settings: patch nothing, and stop any process that imports a trainer module
    vlpatch patches, at that import, with `error` (before it can process data unprotected).

    Processes that import no trainer (pip, an editor, a linter) keep running: the environment stays usable
    for fixing the mistake. A later successful apply() lifts the refusal. Returns the refused hook modules."""
    global _refusal
    with _lock:
        _refusal = error
        try:
            entries = _entries()
        except Exception:  # a matrix that cannot be read: the shipped matrix's hooks
            entries = _matrix.index(_matrix.MATRIX_PATH)
        hooks = sorted({e.hook for e in entries})
        for hook in hooks:
            if hook not in _refusal_hooked:
                _refusal_hooked.add(hook)
                _hooks.when_imported(hook, _refuse_import)
        return hooks


def refusing() -> bool:
    """Whether this process refuses trainer imports because of invalid settings (`refuse`)."""
    return _refusal is not None


def _refuse_import(module) -> None:
    """The one post-import hook that raises into the user's import, on purpose: running the trainer
    unprotected because of a typo is what VLPATCH=1 exists to prevent."""
    if _refusal is None:
        return
    note = f"vlpatch: VLPATCH is set, so this process stops at `import {module.__name__}` rather than run unprotected"
    if isinstance(_refusal, _settings.SettingsError):
        raise _settings.SettingsError(_refusal.problems, note)
    raise VLPatchError(f"vlpatch: auto-enable (VLPATCH) failed: {_refusal!r}\n{note}") from _refusal


_handler = None  # logging.Handler


def _configure_logging(level: str | None) -> None:
    """VLPATCH_LOG_LEVEL=INFO shows, per process, which patch attached (`process_tag`): for torchrun
    ranks and data-loading workers, which log nowhere else. Unset: the application's logging decides."""
    global _handler
    if not level or _handler is not None:
        return
    import logging

    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(level)
    logger.propagate = False


def process_tag() -> str:
    """`pid 123`, plus `rank 1/2` under torchrun / accelerate / deepspeed (they set RANK and WORLD_SIZE)."""
    rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    return f"pid {os.getpid()}" + (f" rank {rank}/{world}" if rank is not None and world else "")


def _announce(patch_id: str) -> None:
    st = _states[patch_id]
    logger.info("vlpatch: %s: %s %s (%s)", process_tag(), patch_id, st.state, st.reason)


_PUBLISHED = tuple(name for name, setting in _settings.SETTINGS.items() if setting.publish)
_saved_env: dict | None = None


def _publish_config() -> None:
    """Worker processes started with `spawn` re-read the environment: keep it in step with apply().

    revert() puts the variables back as they were before the first apply().
    """
    global _saved_env
    if _saved_env is None:
        _saved_env = {k: os.environ.get(k) for k in _PUBLISHED}
    for key in _PUBLISHED:
        setting = _settings.SETTINGS[key]
        value = _settings.published(setting, getattr(_config, setting.field))
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _restore_env() -> None:
    global _saved_env
    for key, value in (_saved_env or {}).items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _saved_env = None


def revert() -> list:
    """Put every original back exactly and stop attaching patches on later imports."""
    global _enabled
    with _lock:
        for patch_id, wraps in list(_applied.items()):
            _unwrap(wraps)
            del _applied[patch_id]
            state = _states.get(patch_id)
            if state is not None:
                state.state, state.reason = "reverted", "vlpatch.revert() restored the originals"
        for state in _states.values():
            if state.state == "pending":
                state.state, state.reason = "reverted", "vlpatch.revert() before the target was imported"
        _enabled = False
        _restore_env()
        return status()


def status() -> list:
    """One dict per patch in the matrix: id, state, reason, version, and patch-specific details."""
    with _lock:
        out = []
        for spec in _entries():
            st = _states.get(spec.id) or PatchState(spec.id, "disabled", "vlpatch.apply() has not been called")
            out.append(st.as_dict())
        return out


def _hook_for(hook_module: str):
    """One post-import hook per module: it attaches every patch whose hook that module is (several
    patches of one upstream, each for its own releases, share it). Where a patch that protects cannot
    attach (`refused`), the import stops with `UnknownUpstreamError`: the process asked for protection."""

    def hook(module):
        try:
            specs = [spec for spec in _matrix.load().patches if spec.hook == hook_module]
        except Exception as exc:  # pragma: no cover - defensive
            specs = []
            for entry in _entries():
                if entry.hook == hook_module:
                    _states[entry.id] = PatchState(entry.id, "refused", f"cannot read the compat matrix: {exc!r}")
        for spec in specs:
            try:
                with _lock:
                    decided = spec.id in _applied or getattr(_states.get(spec.id), "state", None) == "refused"
                    if _enabled and _config.selects(spec.id) and not decided:  # refused: once, not at each import
                        _attach(spec)
            except Exception as exc:  # pragma: no cover - defensive
                _cannot(spec, None, f"internal error while attaching: {exc!r}")
        _stop_if_refused(hook_module)

    return hook


_stopping = True  # False inside `reading_states()`: doctor reads every state, no import stops


class reading_states:
    """`with engine.reading_states():` refused patches are recorded but no import stops (vlpatch doctor)."""

    def __enter__(self):
        global _stopping
        self._was, _stopping = _stopping, False

    def __exit__(self, *exc):
        global _stopping
        _stopping = self._was


def _stop_if_refused(hook_module: str) -> None:
    """Raise into the import of `hook_module` when one of its patches was refused in this process."""
    refused = [_states[e.id] for e in _entries() if e.hook == hook_module and e.id in _states and _states[e.id].state == "refused"]
    if refused and _stopping:
        raise UnknownUpstreamError(refusal_message(hook_module, refused))


def refusal_message(hook_module: str, refused: list) -> str:
    lines = [f"vlpatch: protection was asked for (VLPATCH=1 or vlpatch.apply()), so this process stops at "
             f"`import {hook_module}` rather than run it unprotected:"]
    for st in refused:
        lines.append(f"  {st.id}: {st.reason}")
    nearest = ", ".join(f"{st.id} -> {st.details['nearest']}" for st in refused if st.details.get("nearest"))
    ids = ",".join(st.id for st in refused)
    lines += [
        "Ways on:",
        "  - upgrade vlpatch (a newer one may know this code): install it again from a newer clone or wheel",
        "  - VLPATCH_FORCE=1: try the patch on it anyway" + (f" (the nearest tested code: {nearest})" if nearest else "")
        + "; `vlpatch doctor` then reports it as forced",
        f"  - VLPATCH_EXCLUDE={ids}: train knowingly unprotected",
    ]
    return "\n".join(lines)


def _skip(patch_id: str, version: str | None, reason: str) -> None:
    _states[patch_id] = PatchState(patch_id, "skipped", reason, version)
    logger.warning("vlpatch: patch %s not applied (%s): %s", patch_id, process_tag(), reason)


def _cannot(spec, version: str | None, reason: str, nearest: str | None = None) -> None:
    """The patch cannot attach to the installed code. A speed-up (`optional`) is skipped with a warning;
    a patch that protects is `refused`, and the hook stops the import (`_stop_if_refused`)."""
    if spec.optional:
        return _skip(spec.id, version, reason)
    _states[spec.id] = PatchState(spec.id, "refused", reason, version, {"nearest": nearest} if nearest else {})
    logger.error("vlpatch: patch %s refused (%s): %s", spec.id, process_tag(), reason)


def _stands_aside(spec, v, version: str) -> PatchState | None:
    """A decision that needs no code: nothing to patch (`absent`), upstream fixed it (`native`, or every
    part), or a sibling patch of the same hook covers this release. None: the patch is for this release."""
    if spec.absent and v in spec.absent:  # e.g. a trainer release before the collator the patch wraps existed
        return PatchState(spec.id, "native", f"{spec.distribution} {version} has no code for this patch to fix ({spec.absent}): nothing to patch", version)
    if spec.native and v in spec.native:
        return PatchState(spec.id, "native", f"{spec.distribution} {version} fixes this itself ({spec.native})", version)
    sibling = next((o.id for o in _matrix.load().patches
                    if o.id != spec.id and o.hook == spec.hook and (v in o.applies or (o.absent and v in o.absent))), None)
    if v not in spec.applies and sibling is not None:  # another patch of the matrix covers this release
        return PatchState(spec.id, "skipped", f"not for {spec.distribution} {version}: {sibling} covers it", version)
    parts = {p.name: p.state(v) for p in spec.parts}
    if parts and not any(state == "applied" for state, _ in parts.values()):
        state = "native" if any(state == "native" for state, _ in parts.values()) else "skipped"
        return PatchState(spec.id, state, "no part of this patch is needed here", version, _parts(parts))
    return None


def _resolve(spec, v) -> list:
    """(target, parent, attribute, original) per target of this release; ImportError / AttributeError if one is missing."""
    import importlib

    from . import _wrap

    resolved = []
    for target in spec.targets_for(v):
        module = importlib.import_module(target.module)
        parent, attribute, original = _wrap.resolve_path(module, target.symbol)
        resolved.append((target, parent, attribute, original))
    return resolved


def _found(resolved: list) -> dict:
    out = {}
    for target, _, _, original in resolved:
        try:
            out[target.key] = fingerprint(original)
        except (OSError, TypeError):
            out[target.key] = "unreadable"
    return out


def nearest_tested(spec, version: str) -> str | None:
    """The tested release nearest below `version` (else the oldest tested): what VLPATCH_FORCE would stand on."""
    from packaging.version import Version

    tested = sorted(spec.tested, key=Version)
    below = [t for t in tested if Version(t) <= Version(version)]
    return below[-1] if below else (tested[0] if tested else None)


def _unknown_code(spec, version: str, found: dict) -> str:
    """Why no tested release vouches for the installed code: which targets differ, and whether the lock
    knows the release (a known but untested shape) or not (code newer than this vlpatch)."""
    nearest = nearest_tested(spec, version)
    differ = [k.split(":", 1)[1] for k, fp in found.items() if spec.fingerprints.get(nearest, {}).get(k) != fp] if nearest else list(found)
    shape = spec.shape_of(version)
    if shape is not None and shape.fingerprints == found:
        known = f"its code shape ({shape.releases[0]} - {shape.releases[-1]}) is known but no tested release has it"
    elif shape is not None:
        known = "its installed code differs from that release's wheel (edited locally?)"
    else:
        known = "this vlpatch does not know that release (newer than its lock, or not from the index)"
    where = f"differs from tested {nearest} in {', '.join(differ[:3])}{' and more' if len(differ) > 3 else ''}" if nearest else "no release of it is tested"
    return f"{spec.distribution} {version}: {known}; {where}"


# distribution -> its version, read at the first attach: its module is imported, so the code a later attach
# (`vlpatch scan` applies its passes' patches again and again) sees stays what it is
_attach_versions: dict = {}


def _attach(spec) -> None:
    from packaging.version import InvalidVersion, Version

    version = _attach_versions.get(spec.distribution)
    if version is None:
        version = _attach_versions[spec.distribution] = installed_version(spec.distribution)
    if version is None:
        _states[spec.id] = PatchState(spec.id, "skipped", f"{spec.distribution} is not installed")
        return
    try:
        v = Version(version)
    except InvalidVersion:
        return _cannot(spec, version, f"cannot read the version {version!r} of {spec.distribution}")
    decided = _stands_aside(spec, v, version)
    if decided is not None:
        _states[spec.id] = decided
        return _announce(spec.id)
    if v not in spec.applies and not _config.force:
        return _cannot(spec, version, f"{spec.distribution} {version} is outside every range of the compat matrix "
                       f"(this patch: {spec.applies}, tested {', '.join(spec.tested)})", nearest_tested(spec, version))
    try:
        resolved = _resolve(spec, v)
    except (ImportError, AttributeError) as exc:
        return _cannot(spec, version, f"target missing in {spec.distribution} {version}: {exc}")
    found = _found(resolved)
    vouch = spec.vouching(found, version)
    if vouch is None and not _config.force:
        return _cannot(spec, version, _unknown_code(spec, version, found), nearest_tested(spec, version))
    _wrap_all(spec, v, version, resolved, vouch)


def _wrap_all(spec, v, version: str, resolved: list, vouch: str | None) -> None:
    """Wrap every target or none; the state says which tested release vouches for the code."""
    import importlib
    import inspect

    from . import _wrap

    try:
        integration = importlib.import_module(spec.integration)
        wrappers = integration.wrappers(spec, v)
    except Exception as exc:
        return _cannot(spec, version, f"integration {spec.integration} failed to load: {exc!r}")
    wraps = []
    try:
        for target, parent, attribute, original in resolved:
            wrapper = wrappers.get(target.wrapper) if target.wrapper else None
            if target.wrapper and wrapper is None:
                raise VLPatchError(f"{spec.integration} has no wrapper {target.wrapper!r}")
            if wrapper is None:
                continue  # fingerprint-only target: the patch relies on its behaviour
            had_own = not inspect.isclass(parent) or attribute in vars(parent)
            setattr(parent, attribute, _wrap.Patched(original, wrapper))
            wraps.append((parent, attribute, original, had_own))
    except Exception as exc:
        _unwrap(wraps)
        return _cannot(spec, version, f"could not wrap, left untouched: {exc!r}")
    _applied[spec.id] = wraps
    parts = {p.name: p.state(v) for p in spec.parts}
    details = {**_parts(parts), **getattr(integration, "details", lambda s: {})(spec)}
    if v not in spec.applies:
        reason = f"forced onto {version}, outside its range {spec.applies}" + (f" (code identical to tested {vouch})" if vouch else "")
    elif vouch is None:
        reason = f"forced onto code no tested release has (nearest tested: {nearest_tested(spec, version)})"
    elif vouch == version:
        reason = f"tested on {version}"
    else:
        reason, details["vouched_by"] = f"{version}: code identical to tested {vouch}", vouch
    _states[spec.id] = PatchState(spec.id, "applied", reason, version, details)
    _announce(spec.id)
    if reason.startswith("forced"):
        logger.warning("vlpatch: patch %s FORCED onto untested %s %s", spec.id, spec.distribution, version)


def _parts(parts: dict) -> dict:
    return {"parts": {name: f"{state}: {why}" for name, (state, why) in parts.items()}} if parts else {}


def _unwrap(wraps) -> None:
    for parent, attribute, original, had_own in reversed(wraps):
        if had_own:
            setattr(parent, attribute, original)
        else:
            delattr(parent, attribute)
