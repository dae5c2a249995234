"""Policy `shrink` on LLaMA-Factory's real dataset processors and its real collator.

A sample whose image alone exceeds `cutoff_len` is kept by downsizing the image until the sample fits;
the row then names the image at its new size (a sized entry, `path#vlpatch-size=WxH`; a downsized file
for images given as bytes, frame lists and videos), and LLaMA-Factory's own collator, which re-reads the
media from the rows at training time, must produce exactly as many image features as the row has image
tokens.
"""

import json
import os

import pytest

from tests.conftest import require
from tests.fixtures.tiny_models import long_text

pytestmark = pytest.mark.llamafactory
CUTOFF = 128


@pytest.fixture(scope="module")
def llamafactory_qwen2vl(tiny_qwen2vl, tmp_path_factory):
    """LLaMA-Factory's qwen2_vl template, the tiny Qwen2-VL's tokenizer and processor (images up to 1024 px
    square), a directory for test photos, the image token ids, and `processor(cls_name, **data_kwargs)`:
    one of LLaMA-Factory's real dataset processors on them."""
    require("llamafactory")
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments, ModelArguments
    from llamafactory.model import load_tokenizer

    model_args = ModelArguments(model_name_or_path=tiny_qwen2vl, image_max_pixels=1024 * 1024, image_min_pixels=28 * 28)
    loaded = load_tokenizer(model_args)
    tok, proc = loaded["tokenizer"], loaded["processor"]
    template = get_template_and_fix_tokenizer(tok, DataArguments(template="qwen2_vl", cutoff_len=CUTOFF))
    d = tmp_path_factory.mktemp("photos")

    class LF:
        pass

    out = LF()
    out.tok, out.proc, out.template, out.dir = tok, proc, template, d
    out.pad = tok.convert_tokens_to_ids("<|image_pad|>")
    out.start = tok.convert_tokens_to_ids("<|vision_start|>")
    out.end = tok.convert_tokens_to_ids("<|vision_end|>")

    def processor(cls_name, **data_kwargs):
        import llamafactory.data.processor as P

        data_args = DataArguments(template="qwen2_vl", cutoff_len=data_kwargs.pop("cutoff_len", CUTOFF), **data_kwargs)
        return getattr(P, cls_name)(template=template, tokenizer=tok, processor=proc, data_args=data_args)

    out.processor = processor
    return out


def _photo(llamafactory_qwen2vl, w, h, seed=0):
    from PIL import Image

    path = str(llamafactory_qwen2vl.dir / f"p{w}x{h}_{seed}.jpg")
    if not os.path.exists(path):
        img = Image.new("RGB", (w, h), (40 * seed % 255, 100, 150))
        for x in range(0, w, max(1, w // 16)):  # some structure, so resizing is not trivial
            img.paste((200, 30 * seed % 255, 20), (x, 0, min(w, x + max(1, w // 64)), h))
        img.save(path, quality=92)
    return path


def batch(rows):
    return {
        "_prompt": [r[0] for r in rows],
        "_response": [r[1] for r in rows],
        "_system": ["" for _ in rows],
        "_tools": ["" for _ in rows],
        "_images": [list(r[2]) or None for r in rows],
        "_videos": [None for _ in rows],
        "_audios": [None for _ in rows],
    }


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def runs(llamafactory_qwen2vl, ids):
    """Lengths of the image-pad runs, each checked whole (start, pads, end)."""
    out, i = [], 0
    while i < len(ids):
        if ids[i] == llamafactory_qwen2vl.start:
            j = i + 1
            while j < len(ids) and ids[j] == llamafactory_qwen2vl.pad:
                j += 1
            assert j < len(ids) and ids[j] == llamafactory_qwen2vl.end, f"run at {i} cut"
            out.append(j - i - 1)
            i = j
        elif ids[i] == llamafactory_qwen2vl.pad:
            raise AssertionError(f"stray image token at {i}")
        i += 1
    return out


def collate(llamafactory_qwen2vl, out, rows, kind="image"):
    """LLaMA-Factory's own collator on the processed rows: the features of each `kind` item (grid /
    merge^2), and the collated input_ids."""
    from llamafactory.data import SFTDataCollatorWith4DAttentionMask

    collator = SFTDataCollatorWith4DAttentionMask(template=llamafactory_qwen2vl.template, processor=llamafactory_qwen2vl.proc, tokenizer=llamafactory_qwen2vl.tok, label_pad_token_id=-100)
    feats = []
    for k in rows:
        media = {"images": [], "videos": [], "audios": [], f"{kind}s": out[f"{kind}s"][k] or []}
        feats.append({"input_ids": out["input_ids"][k], "attention_mask": out["attention_mask"][k], "labels": out["labels"][k], **media})
    got = collator(feats)
    merge = llamafactory_qwen2vl.proc.image_processor.merge_size ** 2
    return [int(g.prod()) // merge for g in got[f"{kind}_grid_thw"]], got["input_ids"]


def report_rows(path):
    return [json.loads(x) for x in open(path, encoding="utf-8").read().splitlines()]


def test_shrink_keeps_a_sample_whose_image_alone_is_over_budget(llamafactory_qwen2vl, patched, tmp_path):
    big = _photo(llamafactory_qwen2vl, 1200, 900)
    rows = [
        ([user(long_text(40, 1) + " <image>")], [assistant("a red square")], [big]),
        ([user("<image> " + long_text(30, 2))], [assistant("fits? no")], [_photo(llamafactory_qwen2vl, 640, 640, 3)]),
        ([user("<image> short")], [assistant("fits")], [_photo(llamafactory_qwen2vl, 112, 112, 4)]),
    ]
    # vanilla: the 1200x900 photo is 1,386 image tokens, ten times the budget
    report_path = tmp_path / "r.jsonl"
    patched(report=str(report_path), policy="shrink", shrink_dir=str(tmp_path / "media"), shrink_min_pixels=56 * 56)
    data = batch(rows)
    originals = [list(x) for x in data["_images"]]
    out = llamafactory_qwen2vl.processor("SupervisedDatasetProcessor").preprocess_dataset(data)
    assert len(out["input_ids"]) == 3, "nothing is dropped"
    got = report_rows(report_path)
    shrunk = [r for r in got if r["action"] == "shrunk"]
    assert len(shrunk) == 2, got
    for r in shrunk:
        assert r["reason"].startswith("media_shrunk: "), r
        (item,) = r["media_resized"]
        assert item["item"] == "image#0" and item["tokens_after"] < item["tokens_before"], item
        assert item["after"][0] * item["after"][1] < item["before"][0] * item["before"][1]
        assert item["sized_entry"] == f"{originals[r['batch_position']][0]}#vlpatch-size={item['after'][0]}x{item['after'][1]}", item
        assert "file" not in item, "nothing is written for an image named by a path"
        assert r["tokens_after"] <= CUTOFF
    for k in range(3):
        ids = out["input_ids"][k]
        assert len(ids) <= CUTOFF and len(out["labels"][k]) == len(ids)
        assert len(runs(llamafactory_qwen2vl, ids)) == 1
    # the rows name the originals at the reported size (the originals are untouched; nothing is written)
    from vlpatch.integrations import _media

    for r in shrunk:
        k = r["batch_position"]
        (entry,) = out["images"][k]
        assert entry == r["media_resized"][0]["sized_entry"]
        assert _media.unmark(entry) == (originals[k][0], tuple(r["media_resized"][0]["after"]))
    assert out["images"][2] == originals[2]
    assert not os.path.exists(tmp_path / "media")
    # LLaMA-Factory's own collator re-reads the rows' media: features == tokens for every row
    features, _ = collate(llamafactory_qwen2vl, out, [0, 1, 2])
    assert features == [runs(llamafactory_qwen2vl, out["input_ids"][k])[0] for k in range(3)]


def test_shrink_is_the_largest_size_that_fits(llamafactory_qwen2vl, patched, tmp_path):
    """A larger image than the one chosen would not fit: shrink does not throw away more than it must."""
    big = _photo(llamafactory_qwen2vl, 1000, 750, 5)
    rows = [([user(long_text(10, 1) + " <image>")], [assistant("ok")], [big])]
    report_path = tmp_path / "r.jsonl"
    patched(report=str(report_path), policy="shrink", shrink_dir=str(tmp_path / "media"), shrink_min_pixels=56 * 56)
    out = llamafactory_qwen2vl.processor("SupervisedDatasetProcessor").preprocess_dataset(batch(rows))
    (row,) = report_rows(report_path)
    (item,) = row["media_resized"]
    w, h = item["after"]
    assert len(out["input_ids"][0]) <= CUTOFF
    # the same sample with the image 5% larger (each side) than chosen: dropped under policy drop, or
    # it encodes to the same tokens (the processor's rounding step)
    from PIL import Image

    bigger = str(tmp_path / "bigger.png")
    Image.open(big).resize((int(w * 1.05) + 1, int(h * 1.05) + 1)).save(bigger)
    patched(report=str(tmp_path / "drop.jsonl"), policy="drop")
    again = llamafactory_qwen2vl.processor("SupervisedDatasetProcessor").preprocess_dataset(batch([(rows[0][0], rows[0][1], [bigger])]))
    if again["input_ids"]:
        assert runs(llamafactory_qwen2vl, again["input_ids"][0]) == [item["tokens_after"] - 2], item
    else:
        assert report_rows(tmp_path / "drop.jsonl")[0]["action"] == "dropped"


def test_below_the_floor_the_fallback_decides(llamafactory_qwen2vl, patched, tmp_path):
    big = _photo(llamafactory_qwen2vl, 1200, 900)
    rows = [([user(long_text(40, 1) + " <image>")], [assistant("a red square")], [big])]
    report_path = tmp_path / "r.jsonl"
    patched(report=str(report_path), policy="shrink", shrink_dir=str(tmp_path / "media"), shrink_min_pixels=448 * 448)
    out = llamafactory_qwen2vl.processor("SupervisedDatasetProcessor").preprocess_dataset(batch(rows))
    assert out["input_ids"] == []
    (row,) = report_rows(report_path)
    assert row["action"] == "dropped" and "shrink_failed: it does not fit even with its media at the floor" in row["reason"], row
    patched(report=str(report_path), policy="shrink", shrink_fallback="error", shrink_min_pixels=448 * 448)
    import vlpatch

    with pytest.raises(vlpatch.SampleError, match="media do not fit"):
        llamafactory_qwen2vl.processor("SupervisedDatasetProcessor").preprocess_dataset(batch(rows))


@pytest.mark.parametrize("stage", ["PairwiseDatasetProcessor", "FeedbackDatasetProcessor", "UnsupervisedDatasetProcessor", "PackedSupervisedDatasetProcessor"])
def test_shrink_in_every_stage(llamafactory_qwen2vl, patched, tmp_path, stage):
    big = _photo(llamafactory_qwen2vl, 1200, 900)
    prompt = [user(long_text(20, 1) + " <image>")]
    if stage == "PairwiseDatasetProcessor":
        rows = [(prompt, [assistant("chosen one"), assistant("rejected")], [big])]
    elif stage == "FeedbackDatasetProcessor":
        rows = [(prompt, [assistant("yes"), assistant("")], [big]), ([user("<image> kl")], [assistant(""), assistant("no")], [_photo(llamafactory_qwen2vl, 112, 112, 2)])]
    else:
        rows = [(prompt, [assistant("a red square")], [big])]
    data = batch(rows)
    report_path = tmp_path / "r.jsonl"
    patched(report=str(report_path), policy="shrink", shrink_dir=str(tmp_path / "media"), shrink_min_pixels=56 * 56)
    out = llamafactory_qwen2vl.processor(stage).preprocess_dataset(data)
    got = report_rows(report_path)
    assert [r["action"] for r in got if r["batch_position"] == 0] == ["shrunk"], got
    first = next(k for k in out if k.endswith("input_ids"))
    limit = CUTOFF + 1 if stage.startswith("Packed") else CUTOFF  # packed rows are cutoff_len + 1 upstream
    for key in [k for k in out if k.endswith("input_ids")]:
        for k, ids in enumerate(out[key]):
            extra = len(out["labels"][k]) if stage.startswith("Unsupervised") else 0
            assert len(ids) + extra <= limit
            assert len(runs(llamafactory_qwen2vl, ids)) == 1
    assert out[first], "the sample is kept"
    (entry,) = out["images"][0]
    assert entry.startswith(big + "#vlpatch-size="), entry


@pytest.mark.parametrize("stage", ["SupervisedDatasetProcessor", "SupervisedDatasetProcessor+mask_history", "PairwiseDatasetProcessor", "UnsupervisedDatasetProcessor"])
def test_the_arithmetic_search_decides_as_the_encoding_search(llamafactory_qwen2vl, patched, tmp_path, monkeypatch, stage):
    """Qwen-VL images: the search predicts each candidate's layouts from the header arithmetic instead of
    encoding it, and the chosen size's output is the sample's ids with the runs shortened (a splice),
    not encoded either; every decision, row and token equals what the search that encodes every
    candidate and the chosen size gives, and the collator's features equal the rows' image tokens."""
    from vlpatch.integrations import llamafactory as glue

    stage, _, mask = stage.partition("+")
    options = {"mask_history": True} if mask else {}
    two = "Pairwise" in stage
    reply = (lambda t: [assistant(t), assistant("no")]) if two else (lambda t: [assistant(t)])
    rows = [
        ([user(long_text(30, 1) + " <image>")], reply("one photo"), [_photo(llamafactory_qwen2vl, 1200, 900, 1)]),
        ([user("<image> <image> " + long_text(12, 2))], reply("two in one turn"), [_photo(llamafactory_qwen2vl, 900, 1200, 2), _photo(llamafactory_qwen2vl, 640, 480, 3)]),
        ([user("<image> " + long_text(8, 3)), assistant(long_text(20, 4)), user("<image> later " + long_text(30, 5))],
         reply("the later image leaves"), [_photo(llamafactory_qwen2vl, 1000, 700, 4), _photo(llamafactory_qwen2vl, 300, 300, 5)]),
        ([user(long_text(60, 6) + " <image>")], reply(long_text(40, 7)), [_photo(llamafactory_qwen2vl, 2000, 500, 6)]),
        ([user("<image> fits")], reply("yes"), [_photo(llamafactory_qwen2vl, 112, 112, 8)]),
    ]
    calls = {"predicted": 0, "encoded": 0, "spliced": 0}

    def counted(name, real):
        def run(self, *args):
            got = real(self, *args)
            calls[name] += got is not None
            return got

        return run

    outs, reports = {}, {}
    for mode in ("encoded", "predicted"):
        if mode == "encoded":
            monkeypatch.setattr(glue._Shrinker, "_predict", lambda *a: None)
        else:
            monkeypatch.undo()
        monkeypatch.setattr(glue._Shrinker, "_try", counted("encoded", glue._Shrinker._try))
        if mode == "predicted":
            monkeypatch.setattr(glue._Shrinker, "_predict", counted("predicted", glue._Shrinker._predict))
            monkeypatch.setattr(glue, "_splice", counted("spliced", glue._splice))
        path = tmp_path / f"{mode}.jsonl"
        patched(report=str(path), policy="shrink", shrink_dir=str(tmp_path / "media"), shrink_min_pixels=56 * 56)
        outs[mode] = llamafactory_qwen2vl.processor(stage, cutoff_len=160, **options).preprocess_dataset(batch(rows))
        reports[mode] = [{k: v for k, v in r.items() if k != "time"} for r in report_rows(path)]
        if mode == "encoded":
            encoded_calls, calls["encoded"] = calls["encoded"], 0
    assert calls["predicted"] >= 4 and calls["encoded"] == 0, calls
    assert encoded_calls >= 4
    assert reports["predicted"] == reports["encoded"]
    assert outs["predicted"] == outs["encoded"]
    shrunk = sum(r["action"] == "shrunk" for r in reports["predicted"])
    assert shrunk >= 3 and calls["spliced"] == shrunk, (calls, reports["predicted"])
    if stage == "SupervisedDatasetProcessor":
        out = outs["predicted"]
        features, _ = collate(llamafactory_qwen2vl, out, range(len(out["input_ids"])))
        assert features == [n for ids in out["input_ids"] for n in runs(llamafactory_qwen2vl, ids)]


def test_shrink_keeps_the_entry_form_of_hub_datasets(llamafactory_qwen2vl, patched, tmp_path):
    """Datasets loaded from the hub hold images as {"bytes", "path"} dicts: the downsized entry stays a
    dict (naming the written file), and the collator reads it."""
    big = _photo(llamafactory_qwen2vl, 1200, 900, 7)
    with open(big, "rb") as fh:
        entry = {"bytes": fh.read(), "path": None}
    rows = [([user(long_text(40, 1) + " <image>")], [assistant("a red square")], [entry])]
    patched(report=str(tmp_path / "r.jsonl"), policy="shrink", shrink_dir=str(tmp_path / "media"), shrink_min_pixels=56 * 56)
    out = llamafactory_qwen2vl.processor("SupervisedDatasetProcessor").preprocess_dataset(batch(rows))
    (got,) = out["images"][0]
    assert isinstance(got, dict) and got["bytes"] is None and got["path"].startswith(str(tmp_path / "media")), got
    features, _ = collate(llamafactory_qwen2vl, out, [0])
    assert features == runs(llamafactory_qwen2vl, out["input_ids"][0])


def test_a_sized_entry_is_read_at_its_size_and_fails_loudly_without_vlpatch(llamafactory_qwen2vl, patched, tmp_path):
    """LLaMA-Factory's own `_regularize_images` (what its collator calls on every row) reads a sized
    entry as the original downsized to exactly that size, with the pixels of the original; with vlpatch
    off it raises, naming the entry, instead of reading the full-size original (which would not match
    the row's tokens)."""
    from PIL import Image

    import vlpatch
    from llamafactory.data.mm_plugin import get_mm_plugin
    from vlpatch.integrations import _media

    big = _photo(llamafactory_qwen2vl, 800, 600, 9)
    plugin = get_mm_plugin("qwen2_vl", image_token="<|image_pad|>")
    kwargs = dict(image_max_pixels=1024 * 1024, image_min_pixels=28 * 28)
    entry = _media.sized(big, (400, 300))
    hub = _media.sized({"bytes": None, "path": big}, (400, 300))
    patched(report=str(tmp_path / "r.jsonl"), policy="drop")  # any policy reads them (a reused tokenized_path)

    def read(items):
        got = plugin._regularize_images(items, **kwargs)
        return got["images"] if isinstance(got, dict) else got

    plain, small, dict_small = read([big, entry, hub])
    assert plain.size == (800, 600) and small.size == (400, 300) and dict_small.size == (400, 300)
    expected = Image.open(big).convert("RGB").resize((400, 300), Image.BICUBIC)
    diff = sum(abs(a - b) for a, b in zip(small.convert("RGB").tobytes(), expected.tobytes())) / (400 * 300 * 3)
    assert diff < 4, f"the original's pixels, downsized (mean difference {diff:.2f})"
    assert _media.sized(entry, (10, 10)) is None, "a sized entry is not sized again"
    vlpatch.revert()
    with pytest.raises(FileNotFoundError, match="#vlpatch-size=400x300"):
        read([entry])


# --- videos: pixels, then frames ------------------------------------------------------------------

VIDEO_SIDE, VIDEO_FRAMES = 224, 16  # 8 s at 2 fps: LLaMA-Factory samples all 16 frames (video_fps 2)


def _video(llamafactory_qwen2vl, name="clip.mp4", seed=0):
    from tests.fixtures.tiny_qwen3vl import write_video

    path = str(llamafactory_qwen2vl.dir / name)
    if not os.path.exists(path):
        write_video(path, frames=VIDEO_FRAMES, fps=2, side=VIDEO_SIDE, seed=seed)
    return path


def video_batch(rows):
    data = batch([(p, r, []) for p, r, _ in rows])
    data["_videos"] = [list(r[2]) for r in rows]
    return data


def video_runs(llamafactory_qwen2vl, ids):
    pad, out, n = llamafactory_qwen2vl.tok.convert_tokens_to_ids("<|video_pad|>"), [], 0
    for t in ids:
        if t == pad:
            n += 1
        elif n:
            out.append(n)
            n = 0
    return out


def _shrunk_video(llamafactory_qwen2vl, patched, tmp_path, **settings):
    clip = _video(llamafactory_qwen2vl)
    rows = [([user(long_text(20, 1) + " <video>")], [assistant("a moving square")], [clip])]
    patched(report=str(tmp_path / "v.jsonl"), policy="drop")
    assert llamafactory_qwen2vl.processor("SupervisedDatasetProcessor", cutoff_len=400).preprocess_dataset(video_batch(rows))["input_ids"] == [], "too long as it comes"
    report_path = tmp_path / "r.jsonl"
    patched(report=str(report_path), policy="shrink", shrink_dir=str(tmp_path / "media"), **settings)
    out = llamafactory_qwen2vl.processor("SupervisedDatasetProcessor", cutoff_len=400).preprocess_dataset(video_batch(rows))
    return out, report_rows(report_path)


def check_video_row(llamafactory_qwen2vl, out, row, shrink_dir):
    """The row names the new MPEG-4 file, its tokens are the report's, and LLaMA-Factory's own collator,
    reading the file, gives the video exactly as many features as the row has video tokens."""
    assert row["action"] == "shrunk" and row["tokens_after"] <= 400 and " frames" in row["reason"], row
    (item,) = row["media_resized"]
    assert item["item"] == "video#0" and item["frames_before"] == VIDEO_FRAMES and item["before"] == [VIDEO_SIDE, VIDEO_SIDE], item
    (path,) = out["videos"][0]
    assert path == item["file"] and path.endswith(".mp4") and os.path.dirname(path) == str(shrink_dir)
    ids = out["input_ids"][0]
    assert len(ids) <= 400 and len(out["labels"][0]) == len(ids)
    got = video_runs(llamafactory_qwen2vl, ids)
    assert sum(got) + 2 * len(got) == item["tokens_after"] < item["tokens_before"], (got, item)
    assert collate(llamafactory_qwen2vl, out, [0], kind="video")[0] == got
    return item


def test_shrink_drops_frames_of_a_video_at_its_pixels_floor(llamafactory_qwen2vl, patched, tmp_path):
    """With the frames at the pixels floor already, the video loses frames (spread over its length)
    until the sample fits, and no more: two frames more (one temporal patch) would not fit."""
    out, (row,) = _shrunk_video(llamafactory_qwen2vl, patched, tmp_path, shrink_min_pixels=VIDEO_SIDE * VIDEO_SIDE, shrink_min_frames=2)
    item = check_video_row(llamafactory_qwen2vl, out, row, tmp_path / "media")
    assert item["after"] == [VIDEO_SIDE, VIDEO_SIDE] and 2 <= item["frames_after"] < VIDEO_FRAMES, item
    per_pair = item["tokens_after"] // ((item["frames_after"] + 1) // 2)
    assert row["tokens_after"] + per_pair > 400, "the largest frame count that fits"


def test_shrink_takes_video_pixels_before_frames(llamafactory_qwen2vl, patched, tmp_path):
    """Pixels first, then frames: a video keeps all its frames while smaller frames still gain tokens;
    where the processor has a minimum frame size (Qwen2-VL's video processor on transformers 4.52 on
    upscales small frames), smaller frames gain nothing and the video keeps its pixels and loses frames."""
    out, (row,) = _shrunk_video(llamafactory_qwen2vl, patched, tmp_path, shrink_min_pixels=56 * 56, shrink_min_frames=2)
    item = check_video_row(llamafactory_qwen2vl, out, row, tmp_path / "media")
    if item["frames_after"] < VIDEO_FRAMES:
        assert item["after"] == [VIDEO_SIDE, VIDEO_SIDE] or item["after"][0] * item["after"][1] <= 58 * 58, item
    else:
        assert item["after"][0] < VIDEO_SIDE, item


def test_shrink_videos_below_the_frames_floor_fall_back(llamafactory_qwen2vl, patched, tmp_path):
    out, (row,) = _shrunk_video(llamafactory_qwen2vl, patched, tmp_path, shrink_min_pixels=VIDEO_SIDE * VIDEO_SIDE, shrink_min_frames=VIDEO_FRAMES)
    assert out["input_ids"] == []
    assert row["action"] == "dropped" and "VLPATCH_SHRINK_MIN_FRAMES" in row["reason"], row
    assert not os.path.exists(tmp_path / "media") or not os.listdir(tmp_path / "media"), "nothing written for a dropped sample"


def test_shrink_a_video_given_as_frame_images(llamafactory_qwen2vl, patched, tmp_path):
    """LLaMA-Factory also takes a video as a list of frame images (every frame used): shrink keeps fewer of
    them, spread over the list, each downsized as a PNG file; the collator's features equal the row's."""
    from PIL import Image

    import llamafactory.data.mm_plugin as mm

    if not hasattr(mm, "_check_video_is_nested_images"):
        pytest.skip("this LLaMA-Factory reads every video with PyAV: no frame lists")

    frames = []
    for i in range(VIDEO_FRAMES):
        path = str(tmp_path / f"frame{i:02d}.png")
        Image.new("RGB", (VIDEO_SIDE, VIDEO_SIDE), (10 * i, 80, 160)).save(path)
        frames.append(path)
    rows = [([user(long_text(20, 1) + " <video>")], [assistant("a moving square")], [frames])]
    patched(report=str(tmp_path / "v.jsonl"), policy="drop")
    assert llamafactory_qwen2vl.processor("SupervisedDatasetProcessor", cutoff_len=400).preprocess_dataset(video_batch(rows))["input_ids"] == []
    report_path = tmp_path / "r.jsonl"
    patched(report=str(report_path), policy="shrink", shrink_dir=str(tmp_path / "media"), shrink_min_pixels=VIDEO_SIDE * VIDEO_SIDE, shrink_min_frames=2)
    out = llamafactory_qwen2vl.processor("SupervisedDatasetProcessor", cutoff_len=400).preprocess_dataset(video_batch(rows))
    (row,) = report_rows(report_path)
    assert row["action"] == "shrunk", row
    (item,) = row["media_resized"]
    assert item["frames_before"] == VIDEO_FRAMES and 2 <= item["frames_after"] < VIDEO_FRAMES, item
    (kept,) = out["videos"][0]
    assert len(kept) == item["frames_after"] and all(os.path.dirname(p) == str(tmp_path / "media") for p in kept), kept
    assert all(Image.open(p).size == tuple(item["after"]) for p in kept)
    ids = out["input_ids"][0]
    got = video_runs(llamafactory_qwen2vl, ids)
    assert len(ids) <= 400 and sum(got) + 2 * len(got) == item["tokens_after"] < item["tokens_before"], (got, item)
    assert collate(llamafactory_qwen2vl, out, [0], kind="video")[0] == got
    assert frames == [str(tmp_path / f"frame{i:02d}.png") for i in range(VIDEO_FRAMES)], "the caller's list is untouched"


def test_shrink_qwen3vl_video_keeps_timestamps_over_the_whole_clip(patched, tmp_path, tmp_path_factory):
    """Qwen3-VL writes a `<t seconds>` timestamp before each frame pair, from the file's frame rate and
    duration: the downsized video keeps the original's duration (fewer frames at a lower rate), so the
    kept frames' timestamps still run over the whole clip; the collator's features match the pads."""
    require("llamafactory")
    require("av")
    import re

    from llamafactory.data import SFTDataCollatorWith4DAttentionMask, get_template_and_fix_tokenizer
    from llamafactory.data.template import TEMPLATES
    from llamafactory.hparams import DataArguments, ModelArguments
    from llamafactory.model import load_tokenizer

    from tests.fixtures.tiny_qwen3vl import build_tiny_qwen3vl, has_qwen3vl, write_video

    if not has_qwen3vl() or "qwen3_vl" not in TEMPLATES:
        pytest.skip("this transformers / LLaMA-Factory has no Qwen3-VL")
    model = build_tiny_qwen3vl(str(tmp_path_factory.mktemp("tiny_qwen3vl")))
    clip = write_video(str(tmp_path / "clip.mp4"))  # 16 frames at 4 fps: 4 s, sampled at 2 fps: 8 frames
    loaded = load_tokenizer(ModelArguments(model_name_or_path=model, video_max_pixels=64 * 64, video_fps=2.0, video_maxlen=16))
    tok, proc = loaded["tokenizer"], loaded["processor"]
    import llamafactory.data.processor as P

    data_args = DataArguments(template="qwen3_vl", cutoff_len=40)
    template = get_template_and_fix_tokenizer(tok, data_args)
    patched(report=str(tmp_path / "r.jsonl"), policy="shrink", shrink_dir=str(tmp_path / "media"), shrink_min_pixels=32 * 32, shrink_min_frames=2)
    data = {"_prompt": [[user("<video> what moves?")]], "_response": [[assistant("a square")]], "_system": [""], "_tools": [""],
            "_images": [None], "_videos": [[clip]], "_audios": [None]}
    out = P.SupervisedDatasetProcessor(template=template, tokenizer=tok, processor=proc, data_args=data_args).preprocess_dataset(data)
    (row,) = report_rows(tmp_path / "r.jsonl")
    assert row["action"] == "shrunk" and row["tokens_after"] <= 40, row
    (item,) = row["media_resized"]
    assert item["frames_before"] == 8 and 2 <= item["frames_after"] < 8, item
    ids = out["input_ids"][0]
    stamps = [float(t) for t in re.findall(r"<([\d.]+) seconds>", tok.decode(ids))]
    assert len(stamps) == (item["frames_after"] + 1) // 2, stamps
    import importlib.metadata

    if tuple(int(x) for x in importlib.metadata.version("llamafactory").split(".")[:3]) >= (0, 9, 5):
        # 0.9.5 times frames by the file's rate; 0.9.4 counts them at video_fps whatever the file says
        # (upstream's arithmetic: there any clip of 4 frames is stamped 0-2 s)
        assert stamps[-1] >= 2.0, f"the kept frames span the 4 s clip, not its first seconds: {stamps}"
    collator = SFTDataCollatorWith4DAttentionMask(template=template, processor=proc, tokenizer=tok, label_pad_token_id=-100)
    got = collator([{"input_ids": ids, "attention_mask": out["attention_mask"][0], "labels": out["labels"][0],
                     "images": [], "videos": out["videos"][0], "audios": []}])
    merge = proc.video_processor.merge_size ** 2
    pad = tok.convert_tokens_to_ids("<|video_pad|>")
    assert sum(int(g.prod()) // merge for g in got["video_grid_thw"]) == sum(1 for t in ids if t == pad)
