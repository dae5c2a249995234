import importlib.util
import os

import pytest

# set by scripts/test.sh: the upstream packages (comma-separated) this environment must have
STRICT = {m.strip() for m in os.environ.get("VLPATCH_STRICT", "").split(",") if m.strip()}


def pytest_collection_modifyitems(config, items):
    """Tests marked `slow` (the real trainer) or `heavy` (seconds each) run first, in their order: under
    pytest-xdist a session then ends on short tests, not on one worker's long one while the other idles."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None and item.get_closest_marker("heavy") is None)


def require(module: str):
    """Skip when an upstream package is not installed, or fail where VLPATCH_STRICT names it."""
    if importlib.util.find_spec(module) is None:
        if module in STRICT:
            pytest.fail(f"{module} is not installed but scripts/test.sh requires it", pytrace=False)
        pytest.skip(f"{module} not installed")


@pytest.fixture(scope="session")
def tiny_qwen2vl(tmp_path_factory):
    require("transformers")
    from tests.fixtures.tiny_models import build_tiny_qwen2vl

    return build_tiny_qwen2vl(str(tmp_path_factory.mktemp("tiny_qwen2vl")))


@pytest.fixture(scope="module")
def trl():
    """The trl module, its release as `trl.installed`; skipped where TRL is not installed, outside the trl
    sessions (the TRL collators are the patched code there) and before 0.22.0 (no vision collator)."""
    require("trl")
    if STRICT and "trl" not in STRICT:
        pytest.skip("runs in the trl sessions (the TRL collators are the patched code there)")
    import importlib.metadata

    import trl
    from packaging.version import Version

    trl.installed = Version(importlib.metadata.version("trl"))  # trl.__version__ reads "unknown" on some releases
    if trl.installed < Version("0.22.0"):
        pytest.skip(f"trl {trl.installed} has no vision collator")
    return trl


@pytest.fixture
def patched(tmp_path):
    """vlpatch applied for one test, reverted after it (upstream restored exactly).

    The report goes to the test's temporary directory unless the test names one.
    """
    import vlpatch

    def _apply(**kwargs):
        kwargs.setdefault("report", str(tmp_path / "vlpatch_report.jsonl"))
        vlpatch.revert()
        vlpatch.apply(**kwargs)
        return vlpatch

    yield _apply
    vlpatch.revert()


@pytest.fixture(scope="module")
def vision_utils():
    """The installed unsloth_zoo's real `unsloth_zoo.vision_utils` module, imported on this CPU machine
    (tests/fixtures/unsloth_import.py)."""
    require("unsloth_zoo")
    from tests.fixtures.unsloth_import import import_vision_utils

    return import_vision_utils()


@pytest.fixture(scope="module")
def tiny_qwen2vl_model(tiny_qwen2vl):
    """The tiny Qwen2-VL model (`tiny_qwen2vl`), loaded."""
    from transformers import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration.from_pretrained(tiny_qwen2vl)


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen3_vl", "gemma3", "mllama", "pixtral"])
def unsloth_collator(request, vision_utils, tiny_qwen2vl_model, tiny_qwen2vl, tmp_path_factory):
    """The real Unsloth collator around each image family's real processor (Qwen2-VL: the tiny model's
    own): tests/fixtures/unsloth_collators.py's `image_collator`."""
    from tests.fixtures.unsloth_collators import image_collator

    tmp_dir = str(tmp_path_factory.mktemp("p"))
    return image_collator(request.param, vision_utils, tiny_qwen2vl_model, tiny_qwen2vl, tmp_dir)


def is_newest(distribution: str) -> bool:
    """Whether the installed release is the newest the matrix tests (True where it is not installed)."""
    import importlib.metadata

    from packaging.version import Version

    import vlpatch.matrix as vmatrix

    tested = [Version(v) for p in vmatrix.load().patches if p.distribution == distribution for v in p.tested]
    try:
        installed = Version(importlib.metadata.version(distribution))
    except importlib.metadata.PackageNotFoundError:
        return True
    return not tested or installed == max(tested)


def newest_only(distribution: str, why: str = "") -> None:
    """Skip unless the installed release is the newest the matrix tests: every case runs there, and a
    representative set on the older releases (keeps CI time flat as releases are added; DEVELOPMENT.md
    lists which cases run where). The older LLaMA-Factory sessions name their set in sessions.yaml
    (suite `llamafactory_older`), so there this skip only matters to a run of the whole directory by
    hand; within a trainer's files run whole (TRL) it is what keeps the older sessions short."""
    if not is_newest(distribution):
        pytest.skip(f"runs on the newest tested {distribution} only{': ' + why if why else ''}")
