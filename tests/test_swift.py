"""ms-swift (`swift.truncation`): its real template and its real `swift sft`, on a tiny Qwen2-VL built
offline with Qwen's real special-token ids (ms-swift's Qwen templates hard-code `<|image_pad|>` 151655).

Vanilla `right` loses the vision markers, the chat frame and the answer, and keeps a 2,500-token image
in a row of `max_length` 256; patched, every row fits with whole media spans equal to their grids, the
chat frame and the assistant header, and answer tokens; media that do not fit go to the policy; under
`delete` every deleted row is reported with the row upstream served instead.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import require
from tests.fixtures.swift_rows import (
    BIG,
    IMAGE_PAD,
    VIDEO_PAD,
    build_rows,
    build_tiny_qwen2_5vl,
    spans,
    video_frames,
)
from tests.fixtures.swift_run import four, max_length_error, sft, template

BUDGET = 256


@pytest.fixture(autouse=True)
def _own_modelscope_cache(tmp_path, monkeypatch):
    """ms-swift keeps its map cache (`<cache>/datasets/map_cache/<fingerprint>.arrow`) and file locks under
    the ModelScope cache: sessions side by side with the same rows would share one file (two of them hung)."""
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "modelscope"))


@pytest.fixture(scope="module")
def swift_env(tmp_path_factory):
    require("swift")
    from tests.fixtures.tiny_models import build_tiny_qwen2vl

    root = tmp_path_factory.mktemp("swift")
    model = build_tiny_qwen2vl(str(root / "model"), real_ids=True)
    data, rows = build_rows(str(root / "data"))
    return model, data, rows, build_rows(str(root / "data_short"), short=6)[0]


def _template(model, strategy, family="qwen2_vl", budget=BUDGET):
    return template(model, family, strategy, budget)


def _encode(template, row):
    MaxLengthError = max_length_error()

    try:
        return template.encode(json.loads(json.dumps(row)))
    except MaxLengthError as exc:
        return exc


def _grid_tokens(encoded) -> list:
    grid = encoded.get("image_grid_thw")
    return [] if grid is None else [int(g.prod()) // 4 for g in grid]


def test_vanilla_right_cuts_markers_frame_and_answer(swift_env, patched):
    model, _, rows, _ = swift_env
    import vlpatch

    vlpatch.revert()
    template = _template(model, "right")
    first, second, big = (_encode(template, rows[i]) for i in range(3))
    assert ("broken", 64) in spans(first["input_ids"])  # the pads kept without their markers
    assert not any(label != -100 for label in first["labels"])  # no answer left: a step at loss 0
    assert ("broken", 64) in spans(second["input_ids"])  # the second image's pads after the cut text
    assert len(big["input_ids"]) == (BIG // 14) ** 2 // 4 > BUDGET  # the 2,500-token image trains whole


@pytest.mark.parametrize("strategy", ["right", "left"])
def test_patched_rows_fit_with_whole_spans_frame_and_answer(swift_env, patched, tmp_path, strategy):
    model, _, rows, _ = swift_env
    patched(policy="drop", report=str(tmp_path / "report.jsonl"))
    template = _template(model, strategy)
    MaxLengthError = max_length_error()

    whole = {}
    for i, row in enumerate(rows):
        encoded = _encode(template, row)
        if i == 2:
            assert isinstance(encoded, MaxLengthError) and "media_exceed_budget" in str(encoded)
            continue
        ids = encoded["input_ids"]
        assert len(ids) <= BUDGET and len(encoded["labels"]) == len(ids)
        assert spans(ids) == [("image", n) for n in _grid_tokens(encoded)]  # every span whole, as its grid says
        if encoded.get("pixel_values") is not None:
            assert encoded["pixel_values"].shape[0] == 4 * sum(_grid_tokens(encoded))
        if encoded.get("mm_token_type_ids") is not None:  # ms-swift 4.2 on, transformers 5.3 on
            assert encoded["mm_token_type_ids"].tolist() == [1 if t == IMAGE_PAD else 0 for t in ids]
        answer = [p for p, label in enumerate(encoded["labels"]) if label != -100]
        assert answer, f"row {i} kept no answer"
        text = template.tokenizer.decode(ids)
        assert text.startswith("<|im_start|>system\n"), text[:80]
        if i < 4:  # rows vlpatch cuts: the frame and the assistant header stay
            assert template.tokenizer.decode(ids[: answer[0]]).endswith("<|im_end|>\n<|im_start|>assistant\n")
        whole[i] = len(ids)
    assert len(_encode(_template(model, strategy), rows[3])["input_ids"]) < BUDGET  # the short row is untouched
    report = [json.loads(line) for line in open(tmp_path / "report.jsonl")]
    by_reason = {}
    for r in report:
        by_reason.setdefault(r["action"], []).append(r)
    assert len(by_reason["dropped"]) == 1 and by_reason["dropped"][0]["tokens_before"] > 2500  # once, not per retry
    assert len(by_reason["truncated"]) == 3  # rows 0, 1 and the text-only row 4
    assert all(r["tokens_after"] <= BUDGET for r in by_reason["truncated"])
    assert all(0 < r["answer_tokens_after"] <= r["answer_tokens_before"] for r in by_reason["truncated"])


def test_policies_on_media_that_alone_exceed_max_length(swift_env, patched, tmp_path):
    model, _, rows, _ = swift_env
    from vlpatch.errors import SampleError

    patched(policy="drop_media", report=str(tmp_path / "r1.jsonl"))
    out = _encode(_template(model, "right"), rows[2])
    assert IMAGE_PAD not in out["input_ids"] and "pixel_values" not in out and "image_grid_thw" not in out
    assert any(label != -100 for label in out["labels"])
    row = [json.loads(line) for line in open(tmp_path / "r1.jsonl")][0]
    assert row["action"] == "media_dropped" and row["media_removed"] == {"image": [0]}

    patched(policy="shrink", report=str(tmp_path / "r2.jsonl"))
    out = _encode(_template(model, "right"), rows[2])
    assert len(out["input_ids"]) <= BUDGET and spans(out["input_ids"]) == [("image", n) for n in _grid_tokens(out)]
    assert out["pixel_values"].shape[0] == 4 * sum(_grid_tokens(out)) and _grid_tokens(out)[0] > 16
    row = [json.loads(line) for line in open(tmp_path / "r2.jsonl")][0]
    assert row["action"] == "shrunk" and row["media_resized"][0]["tokens_after"] < 2500

    patched(policy="error", report=str(tmp_path / "r3.jsonl"))
    with pytest.raises(SampleError, match="describe"):
        _template(model, "right").encode(json.loads(json.dumps(rows[2])))


def test_preference_rows_keep_their_media_together(swift_env, patched, tmp_path):
    """`rlhf` mode (DPO): chosen and rejected are encoded one at a time, each cut with whole spans; a row
    whose media would have to leave one side is deleted under `drop_media` rather than pair a side with
    an image and a side without."""
    model, _, rows, _ = swift_env
    patched(policy="drop_media", report=str(tmp_path / "r.jsonl"))
    template = _template(model, "right")
    template.set_mode("rlhf")
    for i in (0, 1):
        out = _encode(template, {**rows[i], "rejected_response": "no " * 40})
        for side in ("chosen", "rejected"):
            ids = out[f"{side}_input_ids"]
            assert len(ids) <= BUDGET and spans(ids) == [("image", n) for n in _grid_tokens({"image_grid_thw": out[f"{side}_image_grid_thw"]})]
            assert any(label != -100 for label in out[f"{side}_labels"])
    deleted = _encode(template, {**rows[2], "rejected_response": "no " * 40})
    assert isinstance(deleted, max_length_error()) and "keeps its media together" in str(deleted)


def test_lazy_dataset_names_the_row_served_in_place_of_each_deleted_row(swift_env, patched, tmp_path):
    """`delete` (the template's `raise`) under lazy tokenization, in process: ms-swift's real
    `LazyLLMDataset` over its real template, as `swift sft` builds it. Each over-long row (0, 1, 2, 4) is
    deleted as upstream deletes it and reported once, naming the row upstream served in its place: the
    row whose encoding that fetch returned (one of the short rows)."""
    model, _, _, data = swift_env
    from datasets import Dataset

    try:
        from swift.dataset.utils import LazyLLMDataset
    except ImportError:  # 3.x
        from swift.llm.dataset.utils import LazyLLMDataset

    rows = [json.loads(line) for line in open(data)]
    patched(policy="drop", report=str(tmp_path / "r.jsonl"))
    template = _template(model, "raise")
    lazy = LazyLLMDataset(Dataset.from_list([{**row, "images": row.get("images", [])} for row in rows]), template.encode,
                          random_state=0)
    fits = {i: template.encode(json.loads(json.dumps(rows[i])))["input_ids"] for i in range(len(rows)) if i not in (0, 1, 2, 4)}
    told = []
    for i in range(len(rows)):
        served = lazy[i]["input_ids"]
        path = tmp_path / "r.jsonl"
        new = [json.loads(line) for line in open(path)][len(told):] if path.exists() else []
        told += new
        if i in fits:
            assert served == fits[i]  # a row that fits is served as it is
        for r in new:  # rows deleted by this fetch: the one asked for, and replacements upstream tried first
            assert r["action"] == "dropped" and r["reason"].startswith("truncation_strategy_delete"), r
            assert r["replaced_by"] in fits and fits[r["replaced_by"]] == served, (i, r)
    assert sorted(r["index"] for r in told) == [0, 1, 2, 4]  # each once, however often upstream tried it


def test_megatron_context_parallel_rows_keep_their_alignment(swift_env, patched, tmp_path):
    """Megatron with context parallelism (`sequence_parallel_size` 2): a row's length must be a multiple of
    4, and ms-swift 3.8 - 3.10 pad each row to it in `_encode_truncated` (later releases in the collator).
    A row vlpatch cuts, or takes media out of, keeps that: a multiple of 4 within `max_length` (254 here),
    its spans whole, answer tokens kept, upstream's padding at its end only (none spent on the cut)."""
    model, _, rows, _ = swift_env
    import vlpatch

    def megatron(template):
        template.use_megatron, template.sequence_parallel_size = True, 2
        return template

    vlpatch.revert()
    plain = len(_encode(_template(model, "right"), rows[3])["input_ids"])
    padded = len(_encode(megatron(_template(model, "right")), rows[3])["input_ids"])
    if padded == plain and plain % 4:
        pytest.skip("this release pads rows for context parallelism in its collator, not in _encode_truncated")
    assert padded % 4 == 0
    for strategy, policy, i in (("right", "drop", 0), ("left", "drop", 1), ("right", "drop", 4), ("right", "drop_media", 2)):
        patched(policy=policy, report=str(tmp_path / f"{strategy}_{policy}_{i}.jsonl"))
        template = megatron(_template(model, strategy, budget=254))
        out = _encode(template, rows[i])
        ids, labels = out["input_ids"], out["labels"]
        pad = template.tokenizer.pad_token_id
        text = len(ids)
        while ids[text - 1] == pad and labels[text - 1] == -100:
            text -= 1
        assert len(ids) % 4 == 0 and len(ids) <= 254 and len(labels) == len(ids) and len(ids) - text < 4, (i, len(ids), text)
        assert pad not in ids[:text] and spans(ids) == [("image", n) for n in _grid_tokens(out)]
        assert any(label != -100 for label in labels), i
        if i == 2:
            assert IMAGE_PAD not in ids and "pixel_values" not in out


@pytest.mark.heavy  # first in its process: after another test's encodes, ms-swift 4.2 - 4.6's map hangs here
def test_without_lazy_tokenization_each_row_is_reported_and_error_stops(swift_env, patched, tmp_path):
    """`--lazy_tokenize false`: upstream's batched preprocessing deletes a row on any error; vlpatch reports
    the deleted row, and policy `error` stops the run instead of a silent deletion."""
    model, _, rows, _ = swift_env
    from datasets import Dataset

    try:
        from swift.dataset.utils import EncodePreprocessor
    except ImportError:  # 3.x
        from swift.llm.dataset.utils import EncodePreprocessor
    from vlpatch.errors import SampleError

    dataset = Dataset.from_list([{**row, "images": row.get("images", [])} for row in rows])
    patched(policy="drop", report=str(tmp_path / "r.jsonl"))
    out = EncodePreprocessor(template=_template(model, "right"))(dataset, num_proc=1, strict=False, load_from_cache_file=False)
    assert len(out) == 4 and all(len(ids) <= BUDGET for ids in out["input_ids"])
    report = [json.loads(line) for line in open(tmp_path / "r.jsonl")]
    assert [r["sample"] for r in report if r["action"] == "dropped"] == ["<image> describe"]
    patched(policy="error", report=str(tmp_path / "r2.jsonl"))
    with pytest.raises(SampleError, match="describe"):
        EncodePreprocessor(template=_template(model, "right"))(dataset, num_proc=1, strict=False, load_from_cache_file=False)


def test_qwen2_5_vl_video_and_image_spans_stay_whole(tmp_path, patched):
    """Qwen2.5-VL, a video (four frames) and an image after 150 words: vanilla keeps only pad tokens; the
    patch keeps both spans whole at 400 tokens, and under `drop_media` at 320 the image leaves with its
    pixel rows and grid while the video (and its `second_per_grid_ts`) stays."""
    require("swift")
    model = build_tiny_qwen2_5vl(str(tmp_path / "q25"))
    words = " ".join(["the a picture image shows describe what"] * 22)
    row = {"messages": [{"role": "user", "content": words + " <video> and <image> what?"},
                        {"role": "assistant", "content": "a picture of the image " * 5}],
           "videos": [video_frames(str(tmp_path), "v")], "images": [build_rows(str(tmp_path / "rows"))[1][3]["images"][0]]}
    import vlpatch

    def tokens(encoded, grid):
        return [int(g.prod()) // 4 for g in encoded[grid]]

    vlpatch.revert()
    vanilla = _encode(_template(model, "right", "qwen2_5_vl", 400), row)
    assert all(kind == "broken" for kind, _ in spans(vanilla["input_ids"]))  # the markers are gone
    patched(policy="drop", report=str(tmp_path / "r.jsonl"))
    out = _encode(_template(model, "right", "qwen2_5_vl", 400), row)
    assert len(out["input_ids"]) == 400
    assert spans(out["input_ids"]) == [("video", *tokens(out, "video_grid_thw")), ("image", *tokens(out, "image_grid_thw"))]
    assert any(label != -100 for label in out["labels"])
    patched(policy="drop_media", report=str(tmp_path / "r2.jsonl"))
    out = _encode(_template(model, "right", "qwen2_5_vl", 320), row)
    assert spans(out["input_ids"]) == [("video", *tokens(out, "video_grid_thw"))] and len(out["input_ids"]) <= 320
    assert "pixel_values" not in out and "image_grid_thw" not in out and len(out["second_per_grid_ts"]) == 1
    assert out["pixel_values_videos"].shape[0] == 4 * sum(tokens(out, "video_grid_thw"))
    row = [json.loads(line) for line in open(tmp_path / "r2.jsonl")][0]
    assert row["action"] == "media_dropped" and row["media_removed"] == {"image": [0]}


def _qwen3_vl_row(directory) -> dict:
    """150 words, then a video (four 64 px frames: two frame groups of 144 tokens, each after its timestamp)
    and a 224 px image (49 tokens at Qwen3-VL's patch 16), then a 60-token answer."""
    words = " ".join(["the a picture image shows describe what"] * 22)
    return {"messages": [{"role": "user", "content": words + " <video> and <image> what?"},
                         {"role": "assistant", "content": "a picture of the image " * 12}],
            "videos": [video_frames(str(directory), "v3", side=64)],
            "images": [build_rows(str(directory / "rows"))[1][3]["images"][0]]}


@pytest.fixture(scope="module")
def qwen3_vl_model(tmp_path_factory):
    require("swift")
    from tests.fixtures.tiny_qwen3vl import build_tiny_qwen3vl, has_qwen3vl

    if not has_qwen3vl():
        pytest.skip("this transformers has no Qwen3-VL")
    return build_tiny_qwen3vl(str(tmp_path_factory.mktemp("q3") / "model"), real_ids=True)


def test_qwen3_vl_video_frame_groups_and_image_stay_whole(qwen3_vl_model, tmp_path, patched):
    """Qwen3-VL (`qwen3_vl`): a video is one span per frame group, a timestamp before each. Vanilla keeps
    only pad tokens; the patch keeps the video's groups and the image whole, and under `drop_media` the
    image leaves with its pixel rows (330) or both leave with theirs (256); `mm_token_type_ids` follows."""
    row = _qwen3_vl_row(tmp_path)
    import vlpatch

    def tokens(encoded, grid, groups=False):
        return [int(h * w) // 4 for t, h, w in encoded[grid].tolist() for _ in range(int(t) if groups else 1)]

    vlpatch.revert()
    vanilla = _encode(_template(qwen3_vl_model, "right", "qwen3_vl", 400), row)
    assert all(kind == "broken" for kind, _ in spans(vanilla["input_ids"]))
    patched(policy="drop", report=str(tmp_path / "r.jsonl"))
    out = _encode(_template(qwen3_vl_model, "right", "qwen3_vl", 450), row)
    assert len(out["input_ids"]) == 450
    video = [("video", n) for n in tokens(out, "video_grid_thw", groups=True)]
    assert len(video) == 2 and spans(out["input_ids"]) == video + [("image", *tokens(out, "image_grid_thw"))]
    assert any(label != -100 for label in out["labels"])
    types = out.get("mm_token_type_ids")
    if types is not None and types.dim() == 1:  # ms-swift 4.2 on: the row's own, one a token (1 image, 2 video)
        pads = {IMAGE_PAD: 1, VIDEO_PAD: 2}
        assert types.tolist() == [pads.get(t, 0) for t in out["input_ids"]]
    elif types is not None:  # 4.1: the video processor's types for its own text, not the row's: left as upstream made it
        assert types.tolist() == vanilla["mm_token_type_ids"].tolist()
    for budget, left in ((330, ["video"]), (256, [])):
        patched(policy="drop_media", report=str(tmp_path / f"r{budget}.jsonl"))
        out = _encode(_template(qwen3_vl_model, "right", "qwen3_vl", budget), row)
        assert len(out["input_ids"]) == budget and {kind for kind, _ in spans(out["input_ids"])} == set(left)
        assert "pixel_values" not in out and "image_grid_thw" not in out
        assert ("pixel_values_videos" in out) == ("video_grid_thw" in out) == bool(left)
        if left:
            assert out["pixel_values_videos"].shape[0] == 4 * sum(tokens(out, "video_grid_thw", groups=True))
        assert any(label != -100 for label in out["labels"])
        report = [json.loads(line) for line in open(tmp_path / f"r{budget}.jsonl")]
        assert report[0]["media_removed"] == {"image": [0], **({} if left else {"video": [0]})}


def _sft(model, data, out, strategy, env_extra, script=None, family="qwen2_vl", budget=BUDGET):
    return sft(model, data, out, strategy, env_extra, budget, family, script)


@pytest.mark.slow
def test_swift_sft_with_the_env_var_trains_and_names_every_deleted_row(swift_env, tmp_path):
    """`swift sft` with its default `--truncation_strategy delete` and VLPATCH=1: rows 0, 1, 2 and 4
    are over the budget and deleted, as upstream deletes them, each named in the report with the row
    served in its place (one of the short rows 3, 5-10); the run trains."""
    model, _, _, data = swift_env
    report = tmp_path / "report.jsonl"
    proc = _sft(model, data, tmp_path, "delete", {"VLPATCH": "1", "VLPATCH_REPORT": str(report)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(report)]
    deleted = [r for r in rows if r["action"] == "dropped"]
    assert deleted and {r["index"] for r in deleted} <= {0, 1, 2, 4}
    assert all(r["reason"].startswith("truncation_strategy_delete") for r in deleted)
    assert all(r.get("replaced_by") in {3, 5, 6, 7, 8, 9, 10} for r in deleted), deleted


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["right", "left"])
def test_swift_sft_trains_cut_rows_with_apply(swift_env, tmp_path, strategy):
    """The real `sft_main` in a script that calls `vlpatch.apply()` first: every row but the 2,500-token
    one trains (it is deleted and replaced by upstream, reported), and no step is at loss 0."""
    model, data, _, _ = swift_env
    script = tmp_path / "train.py"
    main = "swift.pipelines" if four() else "swift.llm"
    script.write_text(f"import vlpatch\nvlpatch.apply(policy='drop')\nfrom {main} import sft_main\nsft_main()\n")
    report = tmp_path / "report.jsonl"
    proc = _sft(model, data, tmp_path, strategy, {"VLPATCH_REPORT": str(report)}, script=str(script))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(report)]
    assert {r["index"] for r in rows if r["action"] == "truncated"} == {0, 1, 4}
    assert [r["index"] for r in rows if r["action"] == "dropped"] == [2]
    logged = [json.loads(line) for line in open(next(tmp_path.glob("v*/logging.jsonl")))]
    losses = [float(entry["loss"]) for entry in logged if "loss" in entry]
    assert len(losses) == 5 and all(loss > 0 for loss in losses), losses  # one step per row, each with answer tokens


@pytest.mark.slow
def test_swift_sft_trains_qwen3_vl_rows_cut_around_video_and_images(qwen3_vl_model, tmp_path):
    """`swift sft` on Qwen3-VL with VLPATCH=1 and `right` at 400: the video row and the long rows are cut
    with whole spans and train (the model's forward checks every span against its features), loss > 0."""
    _, rows = build_rows(str(tmp_path / "rows"))
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in (rows[0], rows[1], _qwen3_vl_row(tmp_path), rows[3])))
    report = tmp_path / "report.jsonl"
    proc = _sft(qwen3_vl_model, str(data), tmp_path, "right", {"VLPATCH": "1", "VLPATCH_REPORT": str(report)},
                family="qwen3_vl", budget=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(report)]
    assert sorted(r["index"] for r in rows if r["action"] == "truncated") == [0, 2]  # row 1 fits in 400
    logged = [json.loads(line) for line in open(next(tmp_path.glob("v*/logging.jsonl")))]
    losses = [float(entry["loss"]) for entry in logged if "loss" in entry]
    assert len(losses) == 4 and all(loss > 0 for loss in losses), losses
