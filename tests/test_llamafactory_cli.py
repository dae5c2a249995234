"""The real `llamafactory-cli train` (stage sft, 3 steps, CPU) on a tiny offline Qwen2-VL.

Vanilla dies with the vision-token mismatch; with VLPATCH=1 (no code change) or vlpatch.apply() in a
script it trains, and the report names every affected sample.
"""

import json
import os
import re
import shutil
import socket
import sys

import pytest

from tests.conftest import is_newest, newest_only, require
from tests.fixtures import console
from tests.fixtures.tiny_models import IMAGE_TOKENS, build_long_text_image_dataset, build_text_dataset, write_train_yaml

pytestmark = [pytest.mark.llamafactory, pytest.mark.slow]
BIN = os.path.dirname(sys.executable)
DATASETS = "longimg,plaintext"  # 6 image samples (0, 2, 4 cut by cutoff_len 128), then 2 short text-only ones
MISMATCH = ("Image features and image tokens do not match", "shape mismatch")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    require("llamafactory")
    d = tmp_path_factory.mktemp("lfdata")
    build_long_text_image_dataset(str(d), n=6, name="longimg")
    build_text_dataset(str(d), n=2, name="plaintext")
    return str(d)


def train(tmp_path, model, data_dir, env=None, script=None, datasets=DATASETS, fresh=False, **cfg):
    """The run in a fork of the warm interpreter (tests/fixtures/console.py), or a fresh one (`fresh`, a script)."""
    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    cfg.setdefault("cutoff_len", 128)
    yaml_path = write_train_yaml(str(tmp_path / "train.yaml"), model, data_dir, datasets, str(out), **cfg)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("VLPATCH")}
    full_env.update(HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="", PATH=BIN + os.pathsep + os.environ.get("PATH", ""))
    full_env.update(env or {})
    if script:
        cmd = [sys.executable, "-c", script, yaml_path]
    else:
        cmd = [os.path.join(BIN, "llamafactory-cli"), "train", yaml_path]
    proc = console.run(cmd, env=full_env, cwd=str(tmp_path), timeout=600, fresh=fresh)
    report = out / "vlpatch_report.jsonl"
    rows = [json.loads(x) for x in report.read_text().splitlines()] if report.exists() else []
    return proc, rows


def trained(proc):
    return proc.returncode == 0 and "train_runtime" in proc.stdout + proc.stderr


def test_vanilla_dies_on_the_cut_image_run(tmp_path, tiny_qwen2vl, data_dir):
    proc, rows = train(tmp_path, tiny_qwen2vl, data_dir)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0 and any(m in log for m in MISMATCH), log[-3000:]
    assert not rows


def check_truncation_rows(rows):
    assert sorted(r["index"] for r in rows) == [0, 2, 4], rows
    for r in rows:
        assert r["action"] == "truncated" and r["dataset"] == DATASETS and r["split"] == "train"
        assert r["tokens_after"] <= 128 and r["media_tokens_after"] == r["media_tokens"] == IMAGE_TOKENS + 2


def test_env_var_alone_makes_it_train(tmp_path, tiny_qwen2vl, data_dir):
    # the start-up itself in a fresh interpreter on the newest release; on older ones the warm interpreter's
    # fork, which runs the same start-up code (the .pth line) before this release's own `llamafactory-cli`
    proc, rows = train(tmp_path, tiny_qwen2vl, data_dir, env={"VLPATCH": "1"}, fresh=is_newest("llamafactory"))
    log = proc.stdout + proc.stderr
    assert trained(proc), log[-3000:]
    check_truncation_rows(rows)
    assert "samples: 5 kept, 3 truncated, 0 media_dropped, 0 dropped" in log


def test_apply_in_the_training_script(tmp_path, tiny_qwen2vl, data_dir):
    newest_only("llamafactory", "the same patch as VLPATCH=1, which runs on every release")
    script = (
        "import sys, vlpatch; vlpatch.apply()\n"
        "from llamafactory.cli import main\n"
        "sys.argv = ['llamafactory-cli', 'train', sys.argv[1]]\n"
        "main()\n"
    )
    proc, rows = train(tmp_path, tiny_qwen2vl, data_dir, script=script)
    assert trained(proc), (proc.stdout + proc.stderr)[-3000:]
    check_truncation_rows(rows)


def test_report_is_complete_with_two_preprocessing_workers(tmp_path, tiny_qwen2vl, data_dir):
    proc, rows = train(tmp_path, tiny_qwen2vl, data_dir, env={"VLPATCH": "1"}, preprocessing_num_workers=2)
    log = proc.stdout + proc.stderr
    assert trained(proc), log[-3000:]
    check_truncation_rows(rows)
    assert len({r["pid"] for r in rows}) == 2, "rows came from both worker processes"
    assert "samples: 5 kept, 3 truncated, 0 media_dropped, 0 dropped" in log


@pytest.mark.parametrize(
    "policy,summary",
    [
        ("drop", "samples: 2 kept, 0 truncated, 0 media_dropped, 6 dropped"),
        ("drop_media", "samples: 2 kept, 0 truncated, 6 media_dropped, 0 dropped"),
    ],
)
def test_media_that_alone_exceed_cutoff(tmp_path, tiny_qwen2vl, data_dir, policy, summary):
    if policy == "drop_media":
        newest_only("llamafactory", "one policy on the older releases (both in the processor tests)")
    # 66 image tokens cannot fit a cutoff_len of 48: the policy decides, the run still trains
    proc, rows = train(tmp_path, tiny_qwen2vl, data_dir, env={"VLPATCH": "1", "VLPATCH_POLICY": policy}, cutoff_len=48)
    log = proc.stdout + proc.stderr
    assert trained(proc), log[-3000:]
    assert summary in log
    assert sorted(r["index"] for r in rows) == list(range(6))
    assert {r["action"] for r in rows} == {"dropped" if policy == "drop" else "media_dropped"}


def build_photo_dataset(directory: str, name: str = "photos") -> str:
    """4 samples with camera-sized photos (JPEG): even ones 1600x1200 after ~60 words, odd ones 900x1400
    after 5. With image_max_pixels 1024^2 every photo is 1,000+ image tokens: far beyond cutoff_len
    CUT. And a fifth with a 16-frame video (8 s of 224x224): 1,154 video tokens at video_fps 2."""
    from PIL import Image

    from tests.fixtures.tiny_models import _register, long_text
    from tests.fixtures.tiny_qwen3vl import write_video

    rows = []
    for i in range(4):
        size = (1600, 1200) if i % 2 == 0 else (900, 1400)
        img = Image.new("RGB", size, (30 * i, 120, 200))
        for x in range(0, size[0], 50):
            img.paste((220, 40, 40), (x, 0, x + 10, size[1]))
        img.save(os.path.join(directory, f"photo{i}.jpg"), quality=90)
        text = long_text(60 if i % 2 == 0 else 5, seed=40 + i)
        rows.append({"messages": [{"role": "user", "content": f"{text} <image>"}, {"role": "assistant", "content": "stripes"}],
                     "images": [f"photo{i}.jpg"], "videos": []})
    write_video(os.path.join(directory, "clip.mp4"), frames=16, fps=2, side=224)
    rows.append({"messages": [{"role": "user", "content": f"{long_text(20, seed=50)} <video>"}, {"role": "assistant", "content": "a square"}],
                 "images": [], "videos": ["clip.mp4"]})
    return _register(directory, name, rows, {"messages": "messages", "images": "images", "videos": "videos"})


def test_shrink_trains_on_large_photos_and_a_video_and_after_a_tokenized_reload(tmp_path, tiny_qwen2vl, tmp_path_factory):
    """VLPATCH_POLICY=shrink: every photo is downsized, and the video loses frames, until its sample fits;
    the rows name each photo at its new size (and the downsized video file), so the collator (in
    dataloader worker processes) reads what was counted, also when a second run reloads the tokenized
    dataset from `tokenized_path` (no preprocessing, no vlpatch planning); the same dataset loaded
    without vlpatch stops at its first batch (every sample here is shrunk), naming the sized entry."""
    newest_only("llamafactory", "the processor and corpus tests run policy shrink on every release")
    from vlpatch.integrations import _media

    d = str(tmp_path_factory.mktemp("photos"))
    build_photo_dataset(d)
    cut = 400  # a frame pair of the tiny Qwen2-VL's video processor is at least 144 tokens
    big = {"image_max_pixels": 1024 * 1024, "cutoff_len": cut, "datasets": "photos"}
    for sub in ("vanilla", "first", "second"):
        (tmp_path / sub).mkdir()
    proc, rows = train(tmp_path / "vanilla", tiny_qwen2vl, d, **big)
    assert proc.returncode != 0 and any(m in proc.stdout + proc.stderr for m in MISMATCH), (proc.stdout + proc.stderr)[-3000:]
    tokenized = str(tmp_path / "tokenized")
    env = {"VLPATCH": "1", "VLPATCH_POLICY": "shrink", "VLPATCH_SHRINK_MIN_FRAMES": "2"}
    first = tmp_path / "first"
    proc, rows = train(first, tiny_qwen2vl, d, env=env, tokenized_path=tokenized, preprocessing_num_workers=2, **big)
    log = proc.stdout + proc.stderr
    assert trained(proc), log[-3000:]
    assert "samples: 0 kept, 0 truncated, 5 shrunk, 0 media_dropped, 0 dropped" in log, log[-3000:]
    assert sorted(r["source_row"] for r in rows) == [0, 1, 2, 3, 4] and {r["action"] for r in rows} == {"shrunk"}
    for r in rows:
        (item,) = r["media_resized"]
        if r["source_row"] == 4:
            assert item["item"] == "video#0" and item["frames_before"] == 16 and 2 <= item["frames_after"] < 16, r
        else:
            assert item["before"] in ([1600, 1200], [900, 1400]), r
        assert item["tokens_after"] < item["tokens_before"], r
        assert r["tokens_after"] <= cut, r
        if r["source_row"] == 4:  # the video: a downsized file of fewer frames
            assert os.path.isfile(item["file"]) and os.path.dirname(item["file"]) == str(first / "out" / "vlpatch_media"), r
        else:  # a photo: the row names the original at its new size, read so by every worker
            original, size = _media.unmark(item["sized_entry"])
            assert size == tuple(item["after"]) and os.path.isfile(original) and "file" not in item, r
    # a second run from the saved tokenized dataset, two dataloader workers re-reading the rows' files
    second = tmp_path / "second"
    proc, again = train(second, tiny_qwen2vl, d, env=env, tokenized_path=tokenized, dataloader_num_workers=2, **big)
    log = proc.stdout + proc.stderr
    assert "Loaded tokenized dataset" in log and trained(proc), log[-3000:]
    assert not again, "nothing was preprocessed again"
    # the same tokenized dataset without vlpatch: it stops at the first sized entry, saying which,
    # instead of reading the full-size photo that its row's tokens do not match
    third = tmp_path / "third"
    third.mkdir()
    proc, _ = train(third, tiny_qwen2vl, d, tokenized_path=tokenized, **big)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "FileNotFoundError" in log and "#vlpatch-size=" in log, log[-3000:]
    assert not any(m in log for m in MISMATCH), log[-3000:]


def test_policy_error_stops_naming_the_sample(tmp_path, tiny_qwen2vl, data_dir):
    proc, rows = train(tmp_path, tiny_qwen2vl, data_dir, env={"VLPATCH": "1", "VLPATCH_POLICY": "error"}, cutoff_len=48)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "vlpatch: sample longimg[0]: media do not fit the budget" in log, log[-3000:]
    assert not any(m in log for m in MISMATCH)



def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def states(log: str, patch: str = "llamafactory.truncation") -> list:
    """(pid, rank or None, state) from the lines VLPATCH_LOG_LEVEL=INFO prints when a patch attaches
    (progress bars may precede them on a line)."""
    pattern = r"vlpatch: pid (\d+)(?: rank (\d+/\d+))?: " + re.escape(patch) + r" (\w+) "
    return [(int(m[0]), m[1] or None, m[2]) for m in re.findall(pattern, log)]


def test_torchrun_two_ranks_each_patched_report_once(tmp_path, tiny_qwen2vl, data_dir):
    # `llamafactory-cli train` re-launches itself under torchrun: 2 CPU ranks (gloo), VLPATCH=1 alone.
    # Each rank attaches the patch; LLaMA-Factory preprocesses on local rank 0 and the other rank reads
    # its cache (`main_process_first`), so every affected sample is in the report exactly once.
    proc, rows = train(
        tmp_path,
        tiny_qwen2vl,
        data_dir,
        env={"VLPATCH": "1", "VLPATCH_LOG_LEVEL": "INFO", "FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port())},
        ddp_backend="gloo",
        per_device_train_batch_size=1,
    )
    log = proc.stdout + proc.stderr
    assert trained(proc), log[-3000:]
    found = states(log)  # (the launching process may attach too: some releases import the loader there)
    assert sorted(rank for _, rank, _ in found if rank) == ["0/2", "1/2"], found
    assert {state for _, _, state in found} == {"applied"}, found
    check_truncation_rows(rows)
    assert "samples: 5 kept, 3 truncated, 0 media_dropped, 0 dropped" in log


def test_report_is_complete_with_spawned_workers(tmp_path, tiny_qwen2vl, data_dir):
    newest_only("llamafactory", "version-independent: the .pth start-up path")
    # datasets' map workers started with spawn: fresh interpreters that get vlpatch from VLPATCH=1
    # through the .pth file, attach on import, and report into the parent's run
    script = (
        "import sys, multiprocess\n"
        "multiprocess.set_start_method('spawn', force=True)\n"
        "from llamafactory.cli import main\n"
        "sys.argv = ['llamafactory-cli', 'train', sys.argv[1]]\n"
        "main()\n"
    )
    env = {"VLPATCH": "1", "VLPATCH_LOG_LEVEL": "INFO"}
    proc, rows = train(tmp_path, tiny_qwen2vl, data_dir, env=env, script=script, preprocessing_num_workers=2)
    log = proc.stdout + proc.stderr
    assert trained(proc), log[-3000:]
    found = states(log)
    assert {state for _, _, state in found} == {"applied"}, found
    main_pid, patched = found[0][0], {pid for pid, _, _ in found}
    # every map() starts its own pool: the main process, then two new interpreters per map, each patched
    assert len(patched) >= 3, found
    check_truncation_rows(rows)
    row_pids = {r["pid"] for r in rows}
    assert main_pid not in row_pids and row_pids <= patched and len(row_pids) == 2, (row_pids, found)
    assert "samples: 5 kept, 3 truncated, 0 media_dropped, 0 dropped" in log


@pytest.mark.parametrize(
    "env,named",
    [
        ({"VLPATCH_POLICY": "dropmedia"}, "VLPATCH_POLICY='dropmedia'"),
        ({"VLPATCH_PATCHES": "llamafactory.truncaton"}, "VLPATCH_PATCHES='llamafactory.truncaton'"),
        ({"VLPATCH_EXCLUDE": "llamafactory.header_token"}, "VLPATCH_EXCLUDE='llamafactory.header_token'"),
        ({"VLPATCH_POLCY": "drop_media"}, "VLPATCH_POLCY is not a vlpatch setting"),
        ({"VLPATCH": "ture"}, "VLPATCH='ture' is not a switch"),
    ],
)
def test_a_misspelled_setting_stops_the_run_before_preprocessing(tmp_path, tiny_qwen2vl, data_dir, env, named):
    if "VLPATCH_POLICY" not in env:
        newest_only("llamafactory", "the refusal is at the same hook module on every release")
    # the cutoff of test_vanilla_dies_on_the_cut_image_run: unprotected, this run would die in the forward pass
    proc, rows = train(tmp_path, tiny_qwen2vl, data_dir, env={"VLPATCH": "1", **env})
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "vlpatch.settings.SettingsError" in log and named in log, log[-3000:]
    assert "rather than run unprotected" in log
    assert "Running tokenizer on dataset" not in log and "train_runtime" not in log and not rows, log[-3000:]
    assert not any(m in log for m in MISMATCH)


def test_report_rows_name_the_users_dataset_and_file_row(tmp_path, tiny_qwen2vl, data_dir):
    # three datasets merged, the image one second, and a `num_samples` copy of it (LLaMA-Factory picks
    # 4 of its 6 rows at random): each row of the report must lead back to the user's own file row
    info_path = os.path.join(data_dir, "dataset_info.json")
    with open(info_path, encoding="utf-8") as fh:
        info = json.load(fh)
    info["longsampled"] = {**info["longimg"], "num_samples": 4}
    sampled_dir = tmp_path / "data"
    shutil.copytree(data_dir, sampled_dir)
    (sampled_dir / "dataset_info.json").write_text(json.dumps(info))
    proc, rows = train(tmp_path, tiny_qwen2vl, str(sampled_dir), env={"VLPATCH": "1"}, datasets="plaintext,longimg,longsampled")
    assert trained(proc), (proc.stdout + proc.stderr)[-3000:]
    with open(os.path.join(data_dir, "longimg.json"), encoding="utf-8") as fh:
        file_rows = json.load(fh)
    long_rows = {i for i, r in enumerate(file_rows) if len(r["messages"][0]["content"].split()) > 100}
    assert long_rows == {0, 2, 4}
    by_source = {}
    for r in rows:
        assert r["action"] == "truncated" and r["dataset"] == "plaintext,longimg,longsampled", r
        # read the sample back from the user's file by the reported dataset and row: it is a long one
        text = file_rows[r["source_row"]]["messages"][0]["content"]
        assert len(text.split()) > 100 and text.endswith("<image>"), (r, text[:80])
        by_source.setdefault(r["source_dataset"], set()).add(r["source_row"])
    assert by_source["longimg"] == {0, 2, 4}, by_source
    assert by_source.get("longsampled") and by_source["longsampled"] <= {0, 2, 4}, by_source
    assert sorted(r["index"] for r in rows if r["source_dataset"] == "longimg") == [2, 4, 6], "merged index too"
