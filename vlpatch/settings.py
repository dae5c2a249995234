"""Every setting vlpatch reads, in one table, validated in one place.

A typo must never turn protection off: each environment variable (`VLPATCH*`), each `apply()` argument
and each command-line value is checked against this table, and a bad one is reported with the setting,
the value, the valid values and the closest match. Variables named `VLPATCH_*` that vlpatch does not
know are errors too (`VLPATCH_POLCY=drop_media` would otherwise be ignored). Imports nothing heavy.
"""

from __future__ import annotations

import os

from .errors import POLICY_NAMES, VLPatchError

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class SettingsError(VLPatchError):
    """One or more settings are invalid; the message names each setting, its value and the valid ones."""

    def __init__(self, problems: list, note: str = ""):
        self.problems = list(problems)
        if len(self.problems) == 1:
            text = f"vlpatch: invalid setting: {self.problems[0]}"
        else:
            text = "vlpatch: invalid settings:" + "".join(f"\n  - {p}" for p in self.problems)
        super().__init__(text + (f"\n{note}" if note else ""))


def closest(value: str, valid) -> str:
    """`; did you mean 'x'?` for the closest valid value, or nothing."""
    import difflib

    match = difflib.get_close_matches(value, list(valid), n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""


def _bad(source: str, value, valid, what: str) -> str:
    valid = list(valid)
    return f"{source}={value!r} is not {what} (valid: {', '.join(valid)}{closest(str(value), valid)})"


def check_switch(source: str, value: str) -> str | None:
    v = value.strip().lower()
    if v in TRUE or v in FALSE or v == "":
        return None
    return _bad(source, value, TRUE + FALSE, "a switch")


def check_policy(source: str, value) -> str | None:
    if isinstance(value, str) and value in POLICY_NAMES:
        return None
    return _bad(source, value, sorted(POLICY_NAMES), "a policy")


DEFAULT_SHRINK_MIN_PIXELS = 256 * 256
FALLBACKS = tuple(p for p in POLICY_NAMES if p != "shrink")


def check_fallback(source: str, value) -> str | None:
    if isinstance(value, str) and value in FALLBACKS:
        return None
    return _bad(source, value, FALLBACKS, "a fallback policy for shrink")


def parse_pixels(value) -> int | None:
    """65536, "65536", "256x256" -> 65536; None when it is not a positive pixel count."""
    try:
        if isinstance(value, str):
            text = value.strip().lower().replace("*", "x")
            if "x" in text:
                w, h = text.split("x", 1)
                n = int(w) * int(h)
            else:
                n = int(text)
        elif isinstance(value, int) and not isinstance(value, bool):
            n = value
        else:
            return None
    except ValueError:
        return None
    return n if n > 0 else None


def check_pixels(source: str, value) -> str | None:
    if parse_pixels(value) is not None:
        return None
    return f"{source}={value!r} is not a pixel count (e.g. 65536 or 256x256)"


DEFAULT_SHRINK_MIN_FRAMES = 4


def parse_frames(value) -> int | None:
    """4, "4" -> 4; None when it is not a positive whole number."""
    if isinstance(value, bool):
        return None
    try:
        n = int(value.strip()) if isinstance(value, str) else value if isinstance(value, int) else None
    except ValueError:
        return None
    return n if n is not None and n > 0 else None


def check_frames(source: str, value) -> str | None:
    if parse_frames(value) is not None:
        return None
    return f"{source}={value!r} is not a frame count (a whole number, 1 or more)"


def check_dir(source: str, value) -> str | None:
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        return f"{source}={value!r} is not a directory path"
    if os.path.exists(value) and not os.path.isdir(value):
        return f"{source}={str(value)!r} is a file, not a directory"
    return None


def check_ids(source: str, ids, known) -> list:
    known = list(known)
    return [_bad(source, i, known, "a patch id") for i in ids if i not in known]


def check_report(source: str, value) -> str | None:
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        return f"{source}={value!r} is not a file path"
    if os.path.isdir(value):
        return f"{source}={str(value)!r} is a directory; give the report file's path (e.g. {os.path.join(str(value), 'vlpatch_report.jsonl')!r})"
    return None


def check_matrix(source: str, value: str) -> str | None:
    return None if os.path.isfile(value) else f"{source}={value!r}: no such file"


def check_level(source: str, value: str) -> str | None:
    v = value.strip().upper()
    return None if v in LOG_LEVELS or v.isdigit() else _bad(source, value, LOG_LEVELS, "a log level")


DEFAULT_MAX_BAD = 0.05


def parse_share(value) -> float | None:
    """0.05, "0.05", "5%" -> 0.05; None when it is not a share between 0 and 1."""
    try:
        if isinstance(value, str):
            text = value.strip()
            share = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            share = float(value)
        else:
            return None
    except ValueError:
        return None
    return share if 0.0 <= share <= 1.0 else None


def check_share(source: str, value) -> str | None:
    if parse_share(value) is not None:
        return None
    return f"{source}={value!r} is not a share between 0 and 1 (e.g. 0.05 or 5%)"


PARSERS = {"share": parse_share, "pixels": parse_pixels, "frames": parse_frames}

# one check per kind of setting (`ids` needs the matrix's patch ids: check_env calls check_ids itself)
CHECKS = {
    "switch": check_switch,
    "policy": check_policy,
    "report": check_report,
    "matrix": check_matrix,
    "level": check_level,
    "share": check_share,
    "pixels": check_pixels,
    "frames": check_frames,
    "fallback": check_fallback,
    "dir": check_dir,
}


class Setting:
    """One `VLPATCH_*` variable. `field`: the `engine.Config` attribute it sets (and the `apply()`
    argument of that name, where apply() has one), `default` its value when unset; `publish`: how
    apply() hands it on to worker processes through the environment ("always", "changed": only a
    value other than the default, None: not at all)."""

    __slots__ = ("name", "kind", "meaning", "field", "default", "publish")

    def __init__(self, name: str, kind: str, meaning: str, field: str | None = None, default=None, publish: str | None = None):
        self.name = name
        self.kind = kind  # switch | policy | ids | report | matrix | level | share | pixels | fallback | dir | tooling | internal
        self.meaning = meaning
        self.field = field
        self.default = default
        self.publish = publish


SETTINGS = {
    s.name: s
    for s in (
        Setting("VLPATCH", "switch", "patch every Python process of this environment at start-up"),
        Setting("VLPATCH_POLICY", "policy", "what happens to a sample whose media alone do not fit", "policy", "drop", "always"),
        Setting("VLPATCH_REPORT", "report", "path of the JSON Lines report", "report", None, "changed"),
        Setting("VLPATCH_PATCHES", "ids", "patch ids to enable (default: all)", "patches", None),
        Setting("VLPATCH_EXCLUDE", "ids", "patch ids to leave off", "exclude", frozenset()),
        Setting("VLPATCH_FORCE", "switch", "apply patches to upstream versions the matrix does not list", "force", False),
        Setting("VLPATCH_MEDIA_FIRST", "switch", "move media placeholders before the text of their message", "media_first", False, "changed"),
        Setting("VLPATCH_MAX_BAD", "share", "the largest share of samples with bad input that is dropped and reported; above it preprocessing stops (default 5%)",
                "max_bad", DEFAULT_MAX_BAD, "changed"),
        Setting("VLPATCH_SHRINK_MIN_PIXELS", "pixels", "policy shrink: no image is made smaller than this many pixels (default 65536, 256x256)",
                "shrink_min_pixels", DEFAULT_SHRINK_MIN_PIXELS, "changed"),
        Setting("VLPATCH_SHRINK_MIN_FRAMES", "frames", "policy shrink: a video keeps at least this many of the frames the trainer samples (default 4); its frames shrink to VLPATCH_SHRINK_MIN_PIXELS first",
                "shrink_min_frames", DEFAULT_SHRINK_MIN_FRAMES, "changed"),
        Setting("VLPATCH_SHRINK_FALLBACK", "fallback", "policy shrink: what happens when the media do not fit even at the floor (default drop)",
                "shrink_fallback", "drop", "changed"),
        Setting("VLPATCH_SHRINK_DIR", "dir", "policy shrink: where LLaMA-Factory's downsized videos, frame lists and images given as bytes are written (default: vlpatch_media in output_dir)",
                "shrink_dir", None, "changed"),
        Setting("VLPATCH_MATRIX", "matrix", "read another compat matrix file"),
        Setting("VLPATCH_LOG_LEVEL", "level", "a stderr handler for the vlpatch logger", "log_level", None),
        Setting("VLPATCH_RUN", "internal", "set by vlpatch itself: the report run of this process tree"),
        # read by vlpatch's own scripts and tests, not by the library
        Setting("VLPATCH_TORCH_SPEC", "tooling", "scripts/setup.sh: the torch stack"),
        Setting("VLPATCH_SESSIONS", "tooling", "scripts/sessions.py: sessions to run"),
        Setting("VLPATCH_STRICT", "tooling", "tests: upstream packages a session must have"),
        Setting("VLPATCH_EXPECT", "tooling", "tests: what a session expects of its upstream"),
        Setting("VLPATCH_CORPUS_FILES", "tooling", "tests: image files in the header-token corpus"),
        Setting("VLPATCH_CORPUS_SAMPLES", "tooling", "tests: samples in the multi-turn corpus"),
        Setting("VLPATCH_TEST_FRESH", "tooling", "tests: every console command in a fresh interpreter, not a fork"),
        Setting("VLPATCH_TEST_CORES", "tooling", "scripts/sessions.py: cores the sessions share"),
        Setting("VLPATCH_NOX_PHASE", "tooling", "scripts/sessions.py: noxfile.py's install pass"),
        Setting("VLPATCH_INDEX_URL", "tooling", "scripts/lock.py: the package index it reads releases from"),
        Setting("VLPATCH_WHEEL_CACHE", "tooling", "scripts/lock.py: where it keeps the wheels it reads"),
    )
}

# the settings that fill `engine.Config`, by its field
FIELDS = {s.field: s for s in SETTINGS.values() if s.field}


def parse(setting: Setting, value):
    """The value of a setting from its variable's text or an `apply()` argument (checked first: None
    where it is not valid)."""
    kind = setting.kind
    if kind == "switch":
        return value if isinstance(value, bool) else str(value).strip().lower() in TRUE
    if kind == "ids":
        return frozenset(split_ids(value) if isinstance(value, str) else value)
    if kind in PARSERS:
        return PARSERS[kind](value)
    if kind == "level":
        return value.strip().upper()
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def published(setting: Setting, value) -> str | None:
    """The variable's text that hands `value` on to worker processes (`Setting.publish`), or None: unset."""
    if setting.publish is None or (setting.publish == "changed" and value == setting.default) or value is None:
        return None
    if setting.kind == "switch":
        return "1" if value else None
    return repr(value) if setting.kind == "share" else str(value)


def check_env(env, known_ids) -> list:
    """Every problem with the `VLPATCH*` variables of `env` (empty values count as unset)."""
    problems = []
    for name in sorted(env):
        if not name.startswith("VLPATCH"):
            continue
        raw = env[name]
        setting = SETTINGS.get(name)
        if setting is None:
            problems.append(f"{name} is not a vlpatch setting (known: {', '.join(s for s in SETTINGS if SETTINGS[s].kind not in ('internal', 'tooling'))}{closest(name, SETTINGS)})")
            continue
        if not raw.strip() or setting.kind in ("internal", "tooling"):
            continue
        value = raw.strip()
        if setting.kind == "ids":
            problems += check_ids(name, split_ids(value), known_ids())
            continue
        problem = CHECKS[setting.kind](name, raw if setting.kind == "switch" else value)
        if problem:
            problems.append(problem)
    return problems


def split_ids(raw: str) -> list:
    return [x.strip() for x in raw.split(",") if x.strip()]


def switch(env, name: str) -> bool:
    return env.get(name, "").strip().lower() in TRUE
