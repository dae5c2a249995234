"""The real `llamafactory-cli train` (stage sft, 2 steps, CPU) on a tiny offline Qwen3-VL with videos.

Qwen3-VL writes a video as one `<t seconds><|vision_start|><|video_pad|>...<|vision_end|>` group per
frame pair. With a paragraph of text before the video, cutoff_len 220 cuts through the video's groups
of samples 0 and 2: vanilla dies in the forward pass (video tokens vs features); with VLPATCH=1 the
text is cut instead, the whole video span kept, and it trains. `vlpatch scan` on the same config says
so before training.
"""

import json
import os
import shutil
import sys

import pytest

from tests.conftest import newest_only, require
from tests.fixtures import console
from tests.fixtures.tiny_models import write_train_yaml
from tests.fixtures.tiny_qwen3vl import PADS_PER_GROUP, VIDEO_SIDE, build_long_text_video_dataset, build_tiny_qwen3vl, has_qwen3vl

pytestmark = [pytest.mark.llamafactory, pytest.mark.slow]
BIN = os.path.dirname(sys.executable)
DATASET = "longvid"  # 4 samples: 0 and 2 put the video after 120 words, 1 and 3 after 5 (they fit)
CUTOFF = 220  # samples 0 and 2 are 269 and 252 tokens, their video span starts before 220 and ends after it
GROUPS = 4  # 4 s at video_fps 2: 8 frames, one group per frame pair
MARKS = GROUPS * (PADS_PER_GROUP + 2)  # <|vision_start|>, the pads, <|vision_end|> of each group
# transformers 5: "Video features and video tokens do not match"; 4.57: "Videos features and video tokens ..."
MISMATCH = ("features and video tokens do not match", "shape mismatch", "Image features and image tokens do not match")
VIDEO_CFG = dict(template="qwen3_vl", video_max_pixels=VIDEO_SIDE * VIDEO_SIDE, video_fps=2.0, video_maxlen=8, max_steps=2)


@pytest.fixture(scope="module")
def tiny_qwen3vl_and_videos(tmp_path_factory):
    """(the tiny Qwen3-VL model's directory, a dataset directory of long-text video examples); the newest
    LLaMA-Factory only, skipped where it or transformers has no Qwen3-VL, or PyAV is missing."""
    require("llamafactory")
    newest_only("llamafactory", "the other releases run the same patch on the processor-level video tests")
    require("transformers")
    if not has_qwen3vl():
        pytest.skip("this transformers has no Qwen3-VL classes")
    require("av")
    from llamafactory.data.template import TEMPLATES

    if "qwen3_vl" not in TEMPLATES:
        pytest.skip("this LLaMA-Factory has no qwen3_vl template")
    model = build_tiny_qwen3vl(str(tmp_path_factory.mktemp("tiny_qwen3vl")))
    data = tmp_path_factory.mktemp("lfvideo")
    build_long_text_video_dataset(str(data), n=4, name=DATASET)
    return model, str(data)


def env_with(extra=None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLPATCH")}
    env.update(HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="", PATH=BIN + os.pathsep + os.environ.get("PATH", ""))
    env.update(extra or {})
    return env


def config(tmp_path, tiny_qwen3vl_and_videos) -> str:
    model, data = tiny_qwen3vl_and_videos
    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    return write_train_yaml(str(tmp_path / "train.yaml"), model, data, DATASET, str(out), CUTOFF, **VIDEO_CFG)


def train(tmp_path, tiny_qwen3vl_and_videos, env=None):
    yaml_path = config(tmp_path, tiny_qwen3vl_and_videos)
    cmd = [os.path.join(BIN, "llamafactory-cli"), "train", yaml_path]
    proc = console.run(cmd, env=env_with(env), timeout=600, cwd=str(tmp_path))
    report = tmp_path / "out" / "vlpatch_report.jsonl"
    rows = [json.loads(x) for x in report.read_text().splitlines()] if report.exists() else []
    return proc, rows


def test_vanilla_dies_on_the_cut_video(tmp_path, tiny_qwen3vl_and_videos):
    proc, rows = train(tmp_path, tiny_qwen3vl_and_videos)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0 and any(m in log for m in MISMATCH), log[-3000:]
    assert "train_runtime" not in log and not rows


def test_env_var_keeps_the_video_whole_and_trains(tmp_path, tiny_qwen3vl_and_videos):
    proc, rows = train(tmp_path, tiny_qwen3vl_and_videos, env={"VLPATCH": "1"})
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "train_runtime" in log, log[-3000:]
    assert log.count("'loss':") == 2, "two optimizer steps"
    assert "samples: 2 kept, 2 truncated, 0 media_dropped, 0 dropped" in log, log[-3000:]
    assert sorted(r["index"] for r in rows) == [0, 2], rows
    for r in rows:
        assert r["action"] == "truncated" and r["reason"] == "text_over_budget" and r["dataset"] == DATASET, r
        assert r["media"] == {"video": 1} and r["media_removed"] == {}, r
        # the whole span: every frame group and its timestamp text
        assert r["media_tokens_after"] == r["media_tokens"] > MARKS, r
        assert r["tokens_before"] > CUTOFF >= r["tokens_after"], r
        assert r["text_tokens_after"] < r["text_tokens_before"], r
    assert len({r["media_tokens"] for r in rows}) == 1, "the same video length in both samples"


def test_scan_reports_the_vanilla_crash_and_the_video_tokens(tmp_path, tiny_qwen3vl_and_videos):
    yaml_path = config(tmp_path, tiny_qwen3vl_and_videos)
    cmd = [sys.executable, "-m", "vlpatch", "scan", yaml_path, "--json", "--no-progress"]
    proc = console.run(cmd, env=env_with(), timeout=600, cwd=str(tmp_path))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    result = json.loads(proc.stdout)
    assert result["config"]["cutoff_len"] == CUTOFF and result["config"]["template"] == "qwen3_vl"
    samples = {s["index"]: s for s in result["samples"]}
    assert sorted(samples) == [0, 1, 2, 3]
    spans = {tuple(s["media_tokens"]["video"]) for s in samples.values()}
    assert len(spans) == 1 and list(samples[0]["media_tokens"]) == ["video"], samples
    (span,) = spans.pop()
    assert span > MARKS, span  # the timestamps are inside the span
    for i in (0, 2):
        s = samples[i]
        assert s["vanilla"] == "crash: media tokens cut" and s["vlpatch"] == "truncated", s
        assert s["tokens"] > CUTOFF and s["tokens"] == s["text_tokens"] + span, s
        assert f"of {MARKS} media tokens" in s["detail"], s
    for i in (1, 3):
        assert samples[i]["vanilla"] == samples[i]["vlpatch"] == "fits", samples[i]
    video = result["recommend"]["media"]["video"]
    assert video["items"] == 4 and video["max_tokens"] == span, video
    from vlpatch.scan import summary

    text = summary(result)
    assert "videos: 4 items" in text and "counted LLaMA-Factory's own processing" in text, text
    assert f"video_max_pixels (now {VIDEO_SIDE * VIDEO_SIDE}), video_maxlen (now 8), video_fps (now 2.0)" in text, text
    assert "image_max_pixels" not in text, "no images: no image advice"
