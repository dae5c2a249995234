"""The GPU check (marker `gpu`): the real `unsloth` (FastVisionModel + LoRA + TRL's SFTTrainer +
UnslothVisionDataCollator) on a tiny offline Qwen2-VL, vanilla and with vlpatch.

Skipped, at collection and before anything imports torch or unsloth, where `unsloth` is not installed or
there is no NVIDIA device (UNSLOTH_ALLOW_CPU=1 lets it run as a CPU dry run); on a device machine
scripts/gpu_unsloth_check.sh installs the carried wheels and runs this file (DEVELOPMENT.md, The GPU check).

The session fixtures build the tiny Qwen2-VL (tests/conftest.py's `tiny_qwen2vl`) and the dataset plan
(tests/fixtures/gpu_unsloth.py: cuts at max_seq_length that land inside an image run, a 448 px image whose
run alone exceeds it, 16-frame videos). Each training stage then runs in its own process
(scripts/gpu_unsloth_check.py --stage, so a CUDA crash in one leaves the others to run) and its test checks
its result. Output under $OUT (default out/gpu_unsloth_check/): environment.txt, build.log, <stage>.log,
result_<stage>.json, vlpatch_report*.jsonl, summary.json and summary.txt (rewritten after each stage).
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import time
import traceback

import pytest

from tests.fixtures import gpu_unsloth as kit

OUT = os.environ.get("OUT") or os.path.join(kit.REPO, "out", "gpu_unsloth_check")
MAX_LEN = int(os.environ.get("GPU_CHECK_MAX_LEN", "192"))
STEPS = int(os.environ.get("GPU_CHECK_STEPS", "4"))
BUDGET = float(os.environ.get("GPU_CHECK_BUDGET", "540"))  # seconds for the build and every stage together
DRY_RUN = os.environ.get("UNSLOTH_ALLOW_CPU") == "1"
# per stage: the longest it may run, and the report it writes (vanilla: none)
TIMEOUTS = {"vanilla": 130, "patched": 170, "shrink": 150, "qlora": 150, "video": 150}
REPORTS = {"patched": "vlpatch_report.jsonl", "shrink": "vlpatch_report_shrink.jsonl",
           "qlora": "vlpatch_report_qlora.jsonl", "video": "vlpatch_report_video.jsonl"}


def _why_not() -> str:
    """Why the check cannot run here ("" where it can), from what is cheap to know: no import of torch or unsloth."""
    why = []
    if importlib.util.find_spec("unsloth") is None:
        why.append("unsloth is not installed (scripts/gpu_unsloth_check.sh installs the carried wheels)")
    if not DRY_RUN:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None and visible.strip() in ("", "-1"):
            why.append("no CUDA device (CUDA_VISIBLE_DEVICES hides them)")
        elif not glob.glob("/dev/nvidia[0-9]*") and not shutil.which("nvidia-smi"):
            why.append("no CUDA device (no /dev/nvidia*, no nvidia-smi)")
    return "; ".join(why)


WHY_NOT = _why_not()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(bool(WHY_NOT), reason=f"GPU check: {WHY_NOT}")]


def _write_summary(state):
    results = state["results"]
    with open(os.path.join(OUT, "summary.json"), "w") as fh:
        json.dump(results, fh, indent=1, default=str)
    reports = {m: os.path.join(OUT, r) for m, r in REPORTS.items()}
    with open(os.path.join(OUT, "summary.txt"), "w") as fh:
        fh.write("\n".join(kit.summary(results, reports)) + f"\ntotal {time.time() - state['t0']:.1f}s\n")


@pytest.fixture(scope="session")
def gpu_check(tmp_path_factory):
    """The run's state: the stages' environment (offline, the repository on PYTHONPATH, no VLPATCH), a work
    directory, the results so far; writes $OUT/environment.txt, and the summary at the end."""
    import torch  # after the cheap checks of the module's skip

    cuda = torch.cuda.is_available()
    if not cuda and not DRY_RUN:
        pytest.skip("GPU check: torch.cuda.is_available() is False (UNSLOTH_ALLOW_CPU=1: a CPU dry run)")
    os.makedirs(OUT, exist_ok=True)
    for path in glob.glob(os.path.join(OUT, "result_*.json")) + glob.glob(os.path.join(OUT, "vlpatch_report*.jsonl")):
        os.remove(path)
    env = dict(os.environ, **kit.OFFLINE, OUT=OUT, GPU_CHECK_STEPS=str(STEPS))
    env.pop("VLPATCH", None)
    env["PYTHONPATH"] = os.pathsep.join([p for p in [env.get("PYTHONPATH", ""), kit.REPO] if p])
    if not cuda:
        env.setdefault("UNSLOTH_ALLOW_CPU", "1")
    lines = [f"time {time.strftime('%Y-%m-%d %H:%M:%S')}, python {sys.version.split()[0]} ({sys.executable})",
             f"PYTHONPATH={env['PYTHONPATH']}", f"OUT={OUT} max_seq_length={MAX_LEN} steps={STEPS} budget={BUDGET:.0f}s",
             f"torch {torch.__version__}, cuda available: {cuda}" + (f", {torch.cuda.get_device_name(0)}" if cuda else
                                                                     " (CPU dry run, UNSLOTH_ALLOW_CPU=1)")]
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        lines.append(f"nvidia-smi: {smi.stdout.strip() or smi.stderr.strip()}")
    except (OSError, subprocess.SubprocessError) as exc:
        lines.append(f"nvidia-smi: {exc!r}")
    lines += [f"{name:18s} {v}" for name, v in kit.versions().items()]
    with open(os.path.join(OUT, "environment.txt"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    state = {"env": env, "t0": time.time(), "results": {}, "work": str(tmp_path_factory.mktemp("gpu_unsloth"))}
    yield state
    _write_summary(state)


@pytest.fixture(scope="session")
def plan(gpu_check, request):
    """The tiny Qwen2-VL (tests/conftest.py's `tiny_qwen2vl`) and the dataset plan for it (build_plan):
    written to the work directory; $OUT/build.log and result_build.json as a stage's."""
    t, buf = time.time(), io.StringIO()
    result = {"ok": False}
    try:
        with contextlib.redirect_stdout(buf):
            model_dir = request.getfixturevalue("tiny_qwen2vl")
            print(f"tiny Qwen2-VL at {model_dir}: {sorted(os.listdir(model_dir))}")
            result = kit.build_plan(model_dir, os.path.join(gpu_check["work"], "plan.json"), MAX_LEN)
    except Exception:
        buf.write(traceback.format_exc())
        if importlib.util.find_spec("torchvision") is None:
            buf.write("(torchvision is not installed: transformers 5.x needs it for Qwen2-VL's video processor)\n")
        raise
    finally:
        with open(os.path.join(OUT, "build.log"), "w") as fh:
            fh.write(buf.getvalue())
        with open(os.path.join(OUT, "result_build.json"), "w") as fh:
            json.dump(result, fh, indent=1)
        gpu_check["results"]["build"] = {"stage": "build", "rc": 0 if result["ok"] else 1,
                                         "seconds": round(time.time() - t, 1), "result": result}
        _write_summary(gpu_check)
        print(buf.getvalue(), flush=True)
    return result


def test_build(plan):
    """The plan: the long samples' text-first cut lands inside an image run, the 448 px image's run alone
    exceeds max_seq_length, the short samples fit."""
    by = {p["name"]: p for p in plan["plan"]}
    for name, which in (("long_1img_cut", 0), ("long_2img_cut", 1)):
        start, length = by[name]["image_runs"][which]
        assert start < MAX_LEN < start + length, by[name]
    assert by["big_image_alone_too_long"]["image_runs"][0][1] > MAX_LEN, by["big_image_alone_too_long"]
    assert by["short_1img"]["tokens"] <= MAX_LEN and by["short_2img"]["tokens"] <= MAX_LEN


def stage_env(stage: str, env: dict) -> dict:
    if stage == "vanilla":
        return env
    env = dict(env, VLPATCH_REPORT=os.path.join(OUT, REPORTS[stage]), VLPATCH_LOG_LEVEL="INFO")
    if stage != "patched":
        env["VLPATCH_POLICY"] = "shrink"
    if stage == "video":
        env["VLPATCH_SHRINK_MIN_FRAMES"] = "2"
    return env


@pytest.mark.parametrize("stage", list(TIMEOUTS))
def test_stage(stage, gpu_check, plan):
    """vanilla: upstream dies on the image-token mismatch. patched (drop), shrink, qlora, video: vlpatch
    applied before `import unsloth`, STEPS optimizer steps, every batch checked whole and within
    max_seq_length, the report says what happened to the media that do not fit."""
    if stage == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed: no 4-bit model")
    timeout = min(TIMEOUTS[stage], BUDGET - (time.time() - gpu_check["t0"]) - 10)
    if timeout < 20:
        pytest.skip(f"the check's budget ({BUDGET:.0f}s, GPU_CHECK_BUDGET) is spent")
    run = kit.run_stage(stage, os.path.join(gpu_check["work"], "plan.json"), OUT, stage_env(stage, gpu_check["env"]), timeout)
    gpu_check["results"][stage] = run
    _write_summary(gpu_check)
    res = run["result"]
    assert not run["timed_out"], f"{stage} ran past {timeout:.0f}s: {run['log']}"
    assert res is not None, f"{stage} wrote no result (rc {run['rc']}): {run['log']}"
    errors = [f"{e['where']}: {e['type']}: {e['message'][:300]}" for e in res["errors"]]
    if stage == "vanilla":
        assert run["rc"] == 1 and not res["ok"], f"vanilla unsloth trained: is the upstream error gone? {run['log']}"
        assert any("token count" in e or "image" in e.lower() for e in res.get("collator_errors", [])), errors
        return
    assert run["rc"] == 0 and res["ok"], errors
    assert not res.get("collator_errors"), res["collator_errors"]
    assert any(row["state"] == "applied" for row in res.get("status", [])), res.get("status")
    if importlib.util.find_spec("bitsandbytes") is not None:  # without it, the stage falls back to transformers + peft
        assert res.get("fast_vision_model") and res.get("fast_vision_peft") and not res.get("fallback_model"), errors
    if stage == "qlora":
        assert res.get("four_bit_modules"), "the model was not quantized"
    assert res["batches"], "no batch checked"
    assert not [bt for bt in res["batches"] if not bt["ok"]], [bt["problems"] for bt in res["batches"] if not bt["ok"]]
    assert len(res["losses"]) == STEPS, res["losses"]
    rows = kit.read_report(os.path.join(OUT, REPORTS[stage]))
    actions = [row["action"] for row in rows]
    if stage == "patched":  # policy drop: the 448 px sample leaves, the long ones are cut between runs
        assert "dropped" in actions and "truncated" in actions, actions
        return
    assert "shrunk" in actions and "dropped" not in actions, actions
    if stage == "video":
        resized = [m for row in rows for m in row.get("media_resized", []) if m["item"].startswith("video")]
        assert resized and all(m["frames_after"] < m["frames_before"] for m in resized), resized
