"""The whole compat matrix as objects (`vlpatch.matrix.load()`): parsed when a hook module is imported."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Target:
    module: str
    symbol: str
    wrapper: str | None  # None: fingerprinted only (the patch relies on it unchanged)
    applies: object = None  # SpecifierSet; None: every version of the patch; else only these (a class added later)

    @property
    def key(self) -> str:
        return f"{self.module}:{self.symbol}"


@dataclass(frozen=True)
class Part:
    """A separately versioned piece of one patch (e.g. multi-image vs truncation in one collator)."""

    name: str
    applies: object  # SpecifierSet
    native: object  # SpecifierSet or None
    summary: str = ""

    def state(self, version) -> tuple:
        if self.native is not None and version in self.native:
            return "native", f"upstream fixed it ({self.native})"
        if version in self.applies:
            return "applied", f"needed ({self.applies})"
        return "skipped", f"not needed here ({self.applies})"


def _specifier(text):
    from packaging.specifiers import SpecifierSet

    return SpecifierSet(text)


@dataclass
class PatchSpec:
    id: str
    distribution: str
    integration: str
    hook: str
    applies: object  # SpecifierSet
    tested: list
    native: object  # SpecifierSet or None
    targets: list
    fingerprints: dict  # tested release -> {target key: fingerprint}, from the lock
    summary: str = ""
    options: dict = field(default_factory=dict)
    parts: list = field(default_factory=list)
    absent: object = None  # SpecifierSet or None: releases without the code the patch is for (nothing to patch)
    shapes: list = field(default_factory=list)  # the lock's Shapes of this patch's range
    optional: bool = False  # a speed-up, not protection: where it cannot attach, a warning, never a stop

    def shape_of(self, version: str):
        """The lock's shape holding this release, or None."""
        return next((s for s in self.shapes if version in s.releases), None)

    def vouching(self, found: dict, version: str | None = None) -> str | None:
        """The tested release whose targets' fingerprints equal `found` (the installed code): `version`
        itself where it is tested with that code, else the first such one; None if there is none."""
        if version is not None and self.fingerprints.get(version) == found:
            return version
        return next((v for v in self.tested if self.fingerprints.get(v) == found), None)

    def targets_for(self, version) -> list:
        """The targets that exist in this upstream version (a target with its own `applies` may not)."""
        from packaging.version import Version

        v = Version(str(version))
        return [t for t in self.targets if t.applies is None or v in t.applies]

    def active_parts(self, version) -> set:
        return {p.name for p in self.parts if p.state(version)[0] == "applied"}


@dataclass
class Matrix:
    patches: list

    def by_id(self, patch_id: str) -> PatchSpec:
        for p in self.patches:
            if p.id == patch_id:
                return p
        raise KeyError(patch_id)


@dataclass(frozen=True)
class Shape:
    """Releases whose targets have the same source (scripts/lock.py), named by the first of them."""

    name: str
    releases: tuple
    fingerprints: dict  # target key -> fingerprint (None: not found in that release's wheel)


# what a collator patch reads per processor class (`processors:` of the matrix), by its options key
PROCESSOR_KEYS = ("media_tokens", "pixel_layout", "video_runs", "audio_tensors")


def _options(raw: dict, processors: dict) -> dict:
    """A patch's options, with the layouts of the processor classes it lists (`options.processors`)
    gathered from the matrix's `processors:` section under their keys (`media_tokens`: class -> table ...)."""
    options = dict(raw.get("options") or {})
    names = options.get("processors")
    if names is None:
        return options
    missing = [n for n in names if n not in processors]
    if missing:
        raise ValueError(f"{raw['id']}: options.processors names {missing}, which the matrix's processors section lacks")
    for key in PROCESSOR_KEYS:
        table = {n: processors[n][key] for n in names if key in processors[n]}
        if table:
            options[key] = table
    return options


def parse(data: dict, lock: dict | None = None) -> Matrix:
    patches = []
    processors = data.get("processors") or {}
    locked = (lock or {}).get("patches", {})
    for raw in data.get("patches", []):
        shapes = [Shape(s["name"], tuple(s["releases"]), dict(s["fingerprints"])) for s in locked.get(raw["id"], {}).get("shapes", [])]
        tested = [str(v) for v in raw.get("tested", [])]
        targets = [
            Target(t["module"], t["symbol"], t.get("wrapper"), _specifier(t["applies"]) if t.get("applies") else None)
            for t in raw["targets"]
        ]
        patches.append(
            PatchSpec(
                id=raw["id"],
                distribution=raw["distribution"],
                integration=raw["integration"],
                hook=raw["hook"],
                applies=_specifier(raw["applies"]),
                tested=tested,
                native=_specifier(raw["native"]) if raw.get("native") else None,
                absent=_specifier(raw["absent"]) if raw.get("absent") else None,
                targets=targets,
                fingerprints={v: s.fingerprints for v in tested for s in shapes if v in s.releases},
                shapes=shapes,
                optional=bool(raw.get("optional")),
                summary=raw.get("summary", ""),
                options=_options(raw, processors),
                parts=[
                    Part(
                        name,
                        _specifier(part.get("applies", "")),
                        _specifier(part["native"]) if part.get("native") else None,
                        part.get("summary", ""),
                    )
                    for name, part in (raw.get("parts") or {}).items()
                ],
            )
        )
    return Matrix(patches)
