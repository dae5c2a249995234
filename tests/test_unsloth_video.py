"""The real `UnslothVisionDataCollator` on videos (unsloth_zoo 2025.9.14 on), vanilla and patched:
Qwen2.5-VL (a video one run) and Qwen3-VL (a video one run per frame group, kept or removed together),
each batch also through a tiny real model of the family (tests/fixtures/unsloth_families.py):
truncation keeping runs whole, videos that do not fit leaving with their tensors, policy shrink keeping
fewer frames, a video without its placeholder refused.

Upstream hands videos to the processor from 2025.9.14 on (`_extract_images_videos_for_example`: the
video parts of the messages, only for examples without an `images` column value); earlier releases
read a message's video parts and drop them.
"""

from types import SimpleNamespace

import pytest

from tests.conftest import require
from tests.fixtures import batch_check
from tests.fixtures.chat_frame import unpadded
from tests.fixtures.tiny_models import long_text
from tests.fixtures.unsloth_collators import needs, premise_cut_inside, report

pytestmark = pytest.mark.unsloth


def video_collator(vision_utils, family: str, tmp_dir: str):
    """The real collator around `family`'s tiny processor and model (tests/fixtures/unsloth_families.py:
    `qwen2_5_vl` or `qwen3_vl`) as a namespace: `family`, `processor`, `model` (its forward checks each
    batch: video / image tokens must match the features of the pixel tensors), `grouped` (a video's frame
    groups are its runs: Qwen3-VL), `layout`, `collator(max_len=None)`. Skips where upstream never hands
    a message's videos to the processor, or this transformers cannot build the family."""
    needs(vision_utils, "_extract_images_videos_for_example", "a message's videos")
    from tests.fixtures import unsloth_families as F

    try:
        processor, _ = getattr(F, family)(tmp_dir)
        model = getattr(F, f"tiny_{family}_model")(processor)
    except (ImportError, AttributeError, TypeError) as exc:
        pytest.skip(f"this transformers cannot build a {family} processor and model: {exc!r}")
    return SimpleNamespace(
        family=family, processor=processor, model=model, grouped=family == "qwen3_vl",
        layout=batch_check.layout(family, processor.tokenizer),
        collator=lambda max_len=None: vision_utils.UnslothVisionDataCollator(model, processor, max_seq_length=max_len, resize="max"),
    )


@pytest.fixture(scope="module")
def qwen2_5_vl_video(vision_utils, tmp_path_factory):
    """Qwen2.5-VL with videos (`video_collator`): a video is one run."""
    return video_collator(vision_utils, "qwen2_5_vl", str(tmp_path_factory.mktemp("q25")))


def video_example(words_before=5, n_videos=1, n_frames=4, words_after=3, image=True, fps=None, side=56):
    """A conversation with media embedded in its user turn (no `images` column: upstream then reads the
    message parts): text, a 56 px image, `n_videos` videos of `n_frames` `side` px frames (Qwen2.5-VL, 56 px: 2 *
    n_frames tokens each; video k sampled at `fps`, else 2 (k + 1) fps, so their second_per_grid_ts
    differ), text."""
    from tests.fixtures.unsloth_families import frames

    size = {"resized_height": 56, "resized_width": 56}
    vsize = {"resized_height": side, "resized_width": side}
    content = [{"type": "text", "text": long_text(words_before, 1)}]
    if image:
        content.append({"type": "image", "image": frames(1, seed=7)[0], **size})
    content += [
        {"type": "video", "video": frames(n_frames, side=side, seed=3 * k), "fps": fps or 2.0 * (k + 1), **vsize}
        for k in range(n_videos)
    ]
    content.append({"type": "text", "text": long_text(words_after, 2)})
    return {
        "messages": [
            {"role": "user", "content": content},
            {"role": "assistant", "content": [{"type": "text", "text": "a red square"}]},
        ]
    }


def check_qwen_rows(qwen2_5_vl_video, batch, budget=None):
    """`batch_check.check`: every vision run whole and, in batch order, as long as its item's grid says
    (Qwen3-VL: a video is t runs, one per frame group, of h * w / 4 tokens each), the pixel tensors
    holding the grids' patches; then Qwen2.5-VL's second_per_grid_ts, one per video (none elsewhere),
    and the real model's forward on the batch. Returns the runs per row."""
    import torch

    found = batch_check.check(
        batch, qwen2_5_vl_video.layout, batch_check.sizes(qwen2_5_vl_video.family, batch), budget=budget, labels=True, wrapped=qwen2_5_vl_video.grouped
    )
    if "video_grid_thw" in batch and not qwen2_5_vl_video.grouped:
        assert len(batch["second_per_grid_ts"]) == batch["video_grid_thw"].shape[0]
    else:
        assert "second_per_grid_ts" not in batch
    with torch.no_grad():
        out = qwen2_5_vl_video.model(**batch)
    assert torch.isfinite(out.loss)
    return found


def _patches(batch, kind, items):
    """The pixel rows of the given items (batch-wide indices) of a Qwen batch, concatenated."""
    import torch

    grid = batch[f"{kind}_grid_thw"].prod(dim=-1).tolist()
    pixels = batch["pixel_values" if kind == "image" else "pixel_values_videos"]
    starts = [sum(grid[:k]) for k in range(len(grid) + 1)]
    return torch.cat([pixels[starts[k] : starts[k + 1]] for k in items])


def vanilla_cuts_and_patched_keeps_every_video(video, batch_in, full, budget, patched, tmp_path):
    """Vanilla at `budget` cuts a video (the processor, the model or `check_qwen_rows` refuses the batch);
    patched (report at tmp_path / "r.jsonl"), the batch passes `check_qwen_rows` with every video of
    `full`, the unbounded batch. Returns the patched batch."""
    with pytest.raises(Exception) as info:
        check_qwen_rows(video, video.collator(budget)(batch_in()), budget)
    assert "video" in str(info.value).lower() or isinstance(info.value, AssertionError), repr(info.value)

    patched(report=str(tmp_path / "r.jsonl"))
    batch = video.collator(budget)(batch_in())
    check_qwen_rows(video, batch, budget)
    assert batch["video_grid_thw"].tolist() == full["video_grid_thw"].tolist(), "no video lost"
    return batch


def test_qwen2_5_vl_video_run_kept_whole_where_the_cut_lands_in_it(qwen2_5_vl_video, patched, tmp_path):
    def batch_in():
        # one video in the batch: 2025.10.13 cannot collate two (below)
        return [video_example(words_before=20, n_frames=16, words_after=120), video_example(1, n_videos=0, words_after=1)]

    full = qwen2_5_vl_video.collator()(batch_in())
    row0 = unpadded(full, 0)
    budget = premise_cut_inside(row0, check_qwen_rows(qwen2_5_vl_video, full)[0], "video")
    batch = vanilla_cuts_and_patched_keeps_every_video(qwen2_5_vl_video, batch_in, full, budget, patched, tmp_path)
    assert unpadded(batch, 1) == unpadded(full, 1), "the example that fits is untouched"
    (row,) = report(tmp_path)
    assert (row["index"], row["action"], row["media"]) == (0, "truncated", {"image": 1, "video": 1}), row
    video_tokens = int(full["video_grid_thw"][0].prod()) // 4
    assert row["media_tokens"] == row["media_tokens_after"] == (4 + 2) + (video_tokens + 2), row
    assert row["tokens_after"] <= budget


def _several_videos(vision_utils):
    """Skip where upstream itself cannot collate a batch with several videos: 2025.10.13's collapse_fps
    calls `isclose` without importing it (NameError), whatever vlpatch does."""
    try:
        vision_utils.collapse_fps([1.0, 2.0])
    except NameError as exc:
        from vlpatch import engine

        pytest.skip(f"unsloth_zoo {engine.installed_version('unsloth_zoo')} cannot collate two videos: collapse_fps raises {exc!r}")


def test_qwen2_5_vl_videos_that_do_not_fit_leave_with_their_tensors(vision_utils, qwen2_5_vl_video, patched, tmp_path):
    from vlpatch.integrations.unsloth import EmptyBatchError, filter_dataset

    _several_videos(vision_utils)
    budget = 60

    def big():  # an image (6 tokens) and three videos of 34 tokens: 108 media tokens
        return video_example(words_before=3, n_videos=3, n_frames=16, words_after=3)

    def small(n_videos=1):
        return video_example(words_before=1, n_videos=n_videos, words_after=1)

    full = qwen2_5_vl_video.collator()([big(), small()])  # no cut: videos 0-2 are example 0's, 3 example 1's
    assert full["video_grid_thw"].shape[0] == 4
    assert len(set(full["second_per_grid_ts"].tolist()[:3])) == 3, "the videos are told apart by their rate"

    patched(policy="drop_media", report=str(tmp_path / "r.jsonl"))
    batch = qwen2_5_vl_video.collator(budget)([big(), small()])
    check_qwen_rows(qwen2_5_vl_video, batch, budget)
    assert batch["input_ids"].shape[0] == 2, "no example dropped"
    # example 0 keeps its image and first video, example 1 all of its own: the trailing videos of example 0
    # left video_grid_thw, pixel_values_videos and second_per_grid_ts together
    assert batch["video_grid_thw"].tolist() == full["video_grid_thw"][[0, 3]].tolist()
    assert batch["second_per_grid_ts"].tolist() == full["second_per_grid_ts"][[0, 3]].tolist()
    assert batch["pixel_values_videos"].equal(_patches(full, "video", [0, 3]))
    assert batch["pixel_values"].equal(full["pixel_values"]) and batch["image_grid_thw"].equal(full["image_grid_thw"])
    (row,) = report(tmp_path)
    assert (row["index"], row["action"], row["media_removed"]) == (0, "media_dropped", {"video": [1, 2]}), row

    patched(policy="drop", report=str(tmp_path / "r.jsonl"))
    batch = qwen2_5_vl_video.collator(budget)([big(), small()])
    check_qwen_rows(qwen2_5_vl_video, batch, budget)
    assert batch["input_ids"].shape[0] == 1 and unpadded(batch, 0) == unpadded(full, 1)
    assert batch["video_grid_thw"].tolist() == full["video_grid_thw"][[3]].tolist()
    assert batch["pixel_values_videos"].equal(_patches(full, "video", [3]))
    assert batch["pixel_values"].equal(_patches(full, "image", [1]))
    assert (report(tmp_path)[-1]["index"], report(tmp_path)[-1]["action"]) == (0, "dropped")
    # the only video-carrying example leaves: no video tensor is left behind for the vision tower
    batch = qwen2_5_vl_video.collator(budget)([big(), small(n_videos=0)])
    check_qwen_rows(qwen2_5_vl_video, batch, budget)
    assert "pixel_values_videos" not in batch and "video_grid_thw" not in batch
    with pytest.raises(EmptyBatchError):
        qwen2_5_vl_video.collator(budget)([big()])
    kept = filter_dataset([small(), big(), small()], qwen2_5_vl_video.collator(budget))
    assert len(kept) == 2
    last = report(tmp_path)[-1]
    assert (last["index"], last["stage"], last["media"]) == (1, "filter_dataset", {"image": 1, "video": 3})

    patched(policy="error")
    import vlpatch

    with pytest.raises(vlpatch.SampleError, match="batch example 0: media do not fit"):
        qwen2_5_vl_video.collator(budget)([big(), small()])


def test_a_video_without_its_placeholder_is_refused_before_the_model(qwen2_5_vl_video, patched, tmp_path, monkeypatch):
    """A chat template that renders no placeholder for video message parts: upstream collates a batch with
    the video's pixels and none of its tokens, and the model's forward pass fails on it ("Video features
    and video tokens do not match"), also for a batch that fits. vlpatch refuses that batch with a clear
    error instead."""
    import vlpatch

    template = qwen2_5_vl_video.processor.chat_template
    assert "video" in template
    # the same template without its video branch: a video part renders as nothing
    monkeypatch.setattr(qwen2_5_vl_video.processor, "chat_template", template.replace("'video'", "'no such part'"))
    examples = [video_example(words_before=1, n_frames=4, words_after=1, image=False)]
    vanilla = qwen2_5_vl_video.collator(10_000)(examples)
    with pytest.raises(Exception):  # transformers 5.6: "... do not match"; 4.57: "torch.cat(): expected a non-empty list"
        qwen2_5_vl_video.model(**{k: v for k, v in vanilla.items() if k != "labels"})
    patched(report=str(tmp_path / "r.jsonl"))
    with pytest.raises(vlpatch.VLPatchError, match=r"0 video run\(s\).*1 video\(s\).*chat template writes no placeholder"):
        qwen2_5_vl_video.collator(10_000)(examples)


def test_qwen2_5_vl_shrink_video_keeps_fewer_frames(qwen2_5_vl_video, patched, tmp_path):
    """Policy shrink on a video given as frames, at the pixels floor already (56 px): it keeps fewer frames,
    spread over the clip, until the example fits, and no fewer; upstream collates the batch again with
    them (its own tensors, second_per_grid_ts included), and the tiny model's forward takes it. (Pixels
    before frames: the core's `ShrinkItem`, tests/test_core.py, and LLaMA-Factory's video tests.)"""
    def batch_in():  # a 16-frame 56 px video: 34 tokens with its markers, over a budget of 24
        return [video_example(words_before=1, n_frames=16, words_after=1, image=False), video_example(1, n_videos=0, words_after=1)]

    budget = 24
    examples = batch_in()
    before = [dict(p) for p in examples[0]["messages"][0]["content"]]
    patched(report=str(tmp_path / "r.jsonl"), policy="shrink", shrink_min_pixels=56 * 56, shrink_min_frames=2)
    batch = qwen2_5_vl_video.collator(budget)(examples)
    check_qwen_rows(qwen2_5_vl_video, batch, budget)
    assert examples[0]["messages"][0]["content"] == before, "the caller's example is untouched"
    row = next(r for r in report(tmp_path) if r["index"] == 0)
    assert row["action"] == "shrunk" and row["tokens_after"] <= budget, row
    (item,) = row["media_resized"]
    assert item["item"] == "video#0" and item["frames_before"] == 16 and item["before"] == item["after"] == [56, 56], item
    assert 2 <= item["frames_after"] < 16 and item["tokens_after"] < item["tokens_before"], item
    t, h, w = batch["video_grid_thw"][0].tolist()
    assert (t * 2, h * 14, w * 14) == (item["frames_after"], 56, 56), "upstream read the kept frames"
    frame = len(qwen2_5_vl_video.processor.tokenizer.encode("<|im_start|>user\n", add_special_tokens=False))  # the row's chat frame
    assert item["tokens_after"] + frame + 4 > budget, "two frames more (one temporal patch, 4 tokens) would not fit beside the frame"


def test_qwen2_5_vl_shrink_video_file_through_upstreams_reader(qwen2_5_vl_video, patched, tmp_path, monkeypatch):
    """A video given as a file: upstream's own reader says how many frames it samples and their size;
    shrink asks it for fewer (`nframes`, spread over the clip by upstream) until the example fits."""
    require("av")  # writes the clip; and upstream's PyAV reader (2026.10.9) reads it
    from tests.fixtures.tiny_qwen3vl import write_video
    from unsloth_zoo import vision_utils

    io = getattr(vision_utils, "io", None)
    if io is not None and not hasattr(io, "read_video") and hasattr(vision_utils, "_read_video_pyav"):
        # torchvision 0.26 has no io.read_video (and there is no decord or FFmpeg here): upstream's own
        # PyAV decoder, its fallback where read_video fails, stands in for it; the sampling is upstream's
        def read_video(path, start_pts=0.0, end_pts=None, pts_unit="sec", output_format="TCHW"):
            video, info = vision_utils._read_video_pyav(path, start_pts, end_pts)
            return video, None, info

        monkeypatch.setattr(io, "read_video", read_video, raising=False)

    path = write_video(str(tmp_path / "clip.mp4"), frames=16, fps=4, side=56)  # 4 s
    part = {"type": "video", "video": path, "fps": 4.0}
    try:
        vision_utils.fetch_video(dict(part))
    except Exception as exc:
        pytest.skip(f"this unsloth_zoo cannot read a video file here: {type(exc).__name__}: {exc}")

    def example():
        return {"messages": [
            {"role": "user", "content": [{"type": "text", "text": "what"}, dict(part), {"type": "text", "text": "moves?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "a square"}]},
        ]}

    full = qwen2_5_vl_video.collator()([example()])
    frames = int(full["video_grid_thw"][0][0]) * 2
    budget = 24
    assert len(unpadded(full, 0)) > budget and frames >= 8, "too long as it comes"
    patched(report=str(tmp_path / "r.jsonl"), policy="shrink", shrink_min_pixels=56 * 56, shrink_min_frames=2)
    examples = [example()]
    batch = qwen2_5_vl_video.collator(budget)(examples)
    check_qwen_rows(qwen2_5_vl_video, batch, budget)
    assert examples == [example()], "the caller's example is untouched"
    (row,) = report(tmp_path)
    assert row["action"] == "shrunk" and row["tokens_after"] <= budget, row
    (item,) = row["media_resized"]
    assert item["item"] == "video#0" and item["frames_before"] == frames and 2 <= item["frames_after"] < frames, item
    assert int(batch["video_grid_thw"][0][0]) * 2 == item["frames_after"], "upstream read that many frames"


# --------------------------------------------------------------------------- Qwen3-VL
# a video is one `<t seconds><|vision_start|> <|video_pad|> x h*w/4 <|vision_end|>` group per temporal
# patch; vlpatch keeps or removes a video's groups together (matrix `video_runs: frame_groups`)


@pytest.fixture(scope="module")
def qwen3_vl_video(vision_utils, tmp_path_factory):
    """Qwen3-VL with videos (`video_collator`): a video is one run per frame group."""
    return video_collator(vision_utils, "qwen3_vl", str(tmp_path_factory.mktemp("q3")))


def test_qwen3_vl_video_frame_groups_kept_together_where_the_cut_lands_in_them(qwen3_vl_video, patched, tmp_path):
    def batch_in():  # one video in the batch (2025.10.13 cannot collate two); every video at the same rate
        return [video_example(60, n_frames=16, words_after=120, fps=2.0), video_example(1, n_videos=0, words_after=1)]

    full = qwen3_vl_video.collator()(batch_in())
    row0 = unpadded(full, 0)
    found = check_qwen_rows(qwen3_vl_video, full)[0]
    groups = [r for r in found if r.kind == "video"]
    assert len(groups) >= 2, groups
    # a cut in the middle group's run: upstream leaves part of the video, which the model refuses
    middle = groups[len(groups) // 2]
    budget = (middle.start + middle.stop) // 2
    lo, hi = groups[0].start, groups[-1].stop  # the video: its groups and the timestamps between them
    video = qwen3_vl_video.layout["video"]
    if row0[hi] == video.end:  # and an outer pair with the first timestamp (transformers 5.17)
        lo, hi = max(p for p in range(lo) if row0[p] == video.start), hi + 1
    media = hi - lo + sum(r.stop - r.start for r in found if r.kind == "image")
    assert media <= budget, (media, budget)
    batch = vanilla_cuts_and_patched_keeps_every_video(qwen3_vl_video, batch_in, full, budget, patched, tmp_path)
    kept = unpadded(batch, 0)
    (pad,) = video.body
    first = kept.index(pad) - 1 - (groups[0].start - lo)  # where the video's run starts
    assert kept[first : first + hi - lo] == row0[lo:hi], "the video kept as it was, timestamps and all"
    (row,) = report(tmp_path)
    assert (row["index"], row["action"], row["media"]) == (0, "truncated", {"image": 1, "video": 1}), row
    assert row["media_tokens"] == row["media_tokens_after"] == media, row


def test_qwen3_vl_videos_that_do_not_fit_leave_whole(vision_utils, qwen3_vl_video, patched, tmp_path):
    _several_videos(vision_utils)
    budget = 100

    def big():  # five videos of 8 frames: each fits alone, all together do not
        return video_example(3, n_videos=5, n_frames=8, words_after=3, fps=2.0)

    def small():
        return video_example(1, n_videos=1, n_frames=4, words_after=1, fps=2.0)

    full = qwen3_vl_video.collator()([big(), small()])
    assert full["video_grid_thw"].shape[0] == 6
    patched(policy="drop_media", report=str(tmp_path / "r.jsonl"))
    batch = qwen3_vl_video.collator(budget)([big(), small()])
    check_qwen_rows(qwen3_vl_video, batch, budget)
    n = batch["video_grid_thw"].shape[0] - 1  # example 0's first videos, then example 1's
    assert 1 <= n < 5 and batch["video_grid_thw"].tolist() == full["video_grid_thw"][list(range(n)) + [5]].tolist()
    assert batch["pixel_values_videos"].equal(_patches(full, "video", list(range(n)) + [5]))
    (row,) = [r for r in report(tmp_path) if r["index"] == 0]
    assert (row["action"], row["media_removed"]) == ("media_dropped", {"video": list(range(n, 5))}), row

    patched(policy="drop", report=str(tmp_path / "r.jsonl"))
    batch = qwen3_vl_video.collator(budget)([big(), small()])
    check_qwen_rows(qwen3_vl_video, batch, budget)
    assert batch["input_ids"].shape[0] == 1 and batch["video_grid_thw"].tolist() == full["video_grid_thw"][[5]].tolist()


