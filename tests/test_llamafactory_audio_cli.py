"""The real `llamafactory-cli train` (stage sft, 2 steps, CPU) on tiny offline audio models.

Qwen2-Audio (template `qwen2_audio`): a 1-second wav after a paragraph of text is
`<|audio_bos|>` + 25 `<|AUDIO|>` + `<|audio_eos|>`; cutoff_len 180 cuts through those tokens in samples
0 and 2. Vanilla dies in the forward pass (audio tokens vs features); with VLPATCH=1 the text is cut
instead, the whole audio span kept, and it trains.

Qwen2.5-Omni thinker (template `qwen2_omni`, `use_audio_in_video`): `<video><audio>` becomes one span
of 45 tokens, the video's chunks around the audio's; cutoff_len 215 cuts through it in samples 0 and 2.
Vanilla dies building the rope positions of the cut span; with VLPATCH=1 it trains.

LLaMA-Factory reads audio with `torchaudio.load`, which needs torchcodec and FFmpeg's shared libraries.
Without a system FFmpeg, the FFmpeg 8 libraries in PyAV's wheel (`av.libs/`, hashed file names) serve:
a directory of links under the sonames torchcodec asks for, and both directories on the training
subprocess's LD_LIBRARY_PATH (the loader reads it at process start only: each run is a fork of a warm
interpreter started with it, tests/fixtures/console.py).
"""

import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

from tests.conftest import newest_only, require
from tests.fixtures import console
from tests.fixtures.tiny_audio import (
    AUDIO_TOKENS,
    AV_SPAN_TOKENS,
    VIDEO_SIDE,
    build_long_text_audio_dataset,
    build_long_text_video_audio_dataset,
    build_tiny_qwen2audio,
    build_tiny_qwen2omni,
    write_wav,
)
from tests.fixtures.tiny_models import write_train_yaml

pytestmark = [pytest.mark.llamafactory, pytest.mark.slow]
BIN = os.path.dirname(sys.executable)
# the sonames torchcodec's FFmpeg 8 core library links against
FFMPEG_SONAMES = ("avutil.so.60", "avcodec.so.62", "avformat.so.62", "avdevice.so.62", "avfilter.so.11", "swscale.so.9", "swresample.so.6")

AUDIO_DATASET = "longaud"  # 4 samples: 0 and 2 put the wav after 120 words, 1 and 3 after 5 (they fit)
AUDIO_CUTOFF = 180  # samples 0 and 2 are 197 and 196 tokens, their audio span starts before 180, ends after
AUDIO_CFG = dict(template="qwen2_audio", max_steps=2)
AUDIO_MISMATCH = ("Audio features and audio tokens do not match", "The number of audio tokens is")

AV_DATASET = "longav"  # the same with <video><audio>
AV_CUTOFF = 215  # samples 0 and 2 are 246 and 235 tokens, their video+audio span straddles 215
AV_CFG = dict(
    template="qwen2_omni", max_steps=2, use_audio_in_video=True, video_max_pixels=VIDEO_SIDE * VIDEO_SIDE,
    video_fps=2.0, video_maxlen=8,
)
AV_MISMATCH = ("cannot be broadcast to indexing result", "Video features and video tokens do not match", "Audio features and audio tokens do not match")


@pytest.fixture(scope="module")
def audio_env(tmp_path_factory):
    """LD_LIBRARY_PATH for the training subprocess: FFmpeg from PyAV's wheel under torchcodec's sonames."""
    require("llamafactory")
    newest_only("llamafactory", "the other releases run the same patch on the processor-level audio tests")
    require("transformers")
    if importlib.util.find_spec("torchcodec") is None:
        pytest.skip("torchcodec not installed: torchaudio.load (LLaMA-Factory's audio reader) needs it")
    av_libs = os.path.join(sysconfig.get_paths()["purelib"], "av.libs")
    if not os.path.isdir(av_libs):
        pytest.skip(f"no FFmpeg libraries for torchcodec: PyAV's wheel directory {av_libs} is missing")
    shim = tmp_path_factory.mktemp("ffshim")
    for soname in FFMPEG_SONAMES:
        base = soname.split(".so")[0]
        found = sorted(glob.glob(os.path.join(av_libs, f"lib{base}-*.so.*")))
        if not found:
            pytest.skip(f"PyAV's av.libs has no lib{base} for torchcodec's lib{soname}")
        os.symlink(found[0], shim / f"lib{soname}")
    paths = [str(shim), av_libs, *filter(None, os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep))]
    env = {"LD_LIBRARY_PATH": os.pathsep.join(paths)}
    # the same call LLaMA-Factory makes, in a process started with that path: a broken shim fails here,
    # named, rather than as a training crash
    wav = write_wav(str(shim / "probe.wav"))
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, torchaudio; print(tuple(torchaudio.load(sys.argv[1])[0].shape))", wav],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=120,
    )
    assert probe.returncode == 0 and probe.stdout.strip() == "(1, 16000)", (probe.stdout + probe.stderr)[-3000:]
    return env


@pytest.fixture(scope="module")
def qwen2audio(tmp_path_factory, audio_env):
    from llamafactory.data.template import TEMPLATES

    if "qwen2_audio" not in TEMPLATES:
        pytest.skip("this LLaMA-Factory has no qwen2_audio template")
    model = build_tiny_qwen2audio(str(tmp_path_factory.mktemp("tiny_qwen2audio")))
    data = tmp_path_factory.mktemp("lfaudio")
    build_long_text_audio_dataset(str(data), n=4, name=AUDIO_DATASET)
    return model, str(data), AUDIO_DATASET, AUDIO_CUTOFF, AUDIO_CFG


@pytest.fixture(scope="module")
def qwen2omni(tmp_path_factory, audio_env):
    from llamafactory.data.template import TEMPLATES

    try:
        from transformers import Qwen2_5OmniForConditionalGeneration, Qwen2VLVideoProcessor  # noqa: F401
    except ImportError:
        pytest.skip("this transformers has no Qwen2.5-Omni or Qwen2-VL video processor classes")
    if "qwen2_omni" not in TEMPLATES:
        pytest.skip("this LLaMA-Factory has no qwen2_omni template")
    require("av")
    model = build_tiny_qwen2omni(str(tmp_path_factory.mktemp("tiny_qwen2omni")))
    data = tmp_path_factory.mktemp("lfav")
    build_long_text_video_audio_dataset(str(data), n=4, name=AV_DATASET)
    return model, str(data), AV_DATASET, AV_CUTOFF, AV_CFG


def train(tmp_path, setup, audio_env, env=None):
    model, data, dataset, cutoff, cfg = setup
    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    yaml_path = write_train_yaml(str(tmp_path / "train.yaml"), model, data, dataset, str(out), cutoff, **cfg)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("VLPATCH")}
    full_env.update(HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="", PATH=BIN + os.pathsep + os.environ.get("PATH", ""))
    full_env.update(audio_env)
    full_env.update(env or {})
    cmd = [os.path.join(BIN, "llamafactory-cli"), "train", yaml_path]
    proc = console.run(cmd, env=full_env, cwd=str(tmp_path), timeout=600)  # a warm interpreter with audio_env's loader path
    report = out / "vlpatch_report.jsonl"
    rows = [json.loads(x) for x in report.read_text().splitlines()] if report.exists() else []
    return proc, rows


def check_trained(proc, rows, dataset, cutoff, media, span):
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "train_runtime" in log, log[-3000:]
    assert log.count("'loss':") == 2, "two optimizer steps"
    assert "samples: 2 kept, 2 truncated, 0 media_dropped, 0 dropped" in log, log[-3000:]
    assert sorted(r["index"] for r in rows) == [0, 2], rows
    for r in rows:
        assert r["action"] == "truncated" and r["reason"] == "text_over_budget" and r["dataset"] == dataset, r
        assert r["media"] == media and r["media_removed"] == {}, r
        assert r["media_tokens_after"] == r["media_tokens"] == span, r  # the whole span, every token
        assert r["tokens_before"] > cutoff >= r["tokens_after"], r
        assert r["text_tokens_after"] < r["text_tokens_before"], r


def test_vanilla_dies_on_the_cut_audio(tmp_path, qwen2audio, audio_env):
    proc, rows = train(tmp_path, qwen2audio, audio_env)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0 and any(m in log for m in AUDIO_MISMATCH), log[-3000:]
    assert "train_runtime" not in log and not rows


def test_env_var_keeps_the_audio_whole_and_trains(tmp_path, qwen2audio, audio_env):
    proc, rows = train(tmp_path, qwen2audio, audio_env, env={"VLPATCH": "1"})
    # <|audio_bos|>, the clip's <|AUDIO|> tokens, <|audio_eos|>
    check_trained(proc, rows, AUDIO_DATASET, AUDIO_CUTOFF, {"audio": 1}, AUDIO_TOKENS + 2)


def test_omni_vanilla_dies_on_the_cut_audio_in_video(tmp_path, qwen2omni, audio_env):
    proc, rows = train(tmp_path, qwen2omni, audio_env)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0 and any(m in log for m in AV_MISMATCH), log[-3000:]
    assert "train_runtime" not in log and not rows


def test_omni_env_var_keeps_the_video_and_its_audio_whole_and_trains(tmp_path, qwen2omni, audio_env):
    proc, rows = train(tmp_path, qwen2omni, audio_env, env={"VLPATCH": "1"})
    # one span per video: both markers pairs, the video's <|VIDEO|> and the audio's <|AUDIO|> tokens
    check_trained(proc, rows, AV_DATASET, AV_CUTOFF, {"video": 1, "audio": 1}, AV_SPAN_TOKENS)
