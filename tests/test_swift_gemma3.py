"""ms-swift's Gemma 3 template (`gemma3_vision`: `Gemma3Processor`, one pixel_values entry per image) under
`swift.truncation`: its real template and its real `swift sft`, on a tiny Gemma 3 built offline with the
real ids the template hard-codes (tests/fixtures/swift_gemma3.py; 16 soft tokens an image).

Vanilla `right` keeps an image's soft tokens without their markers, leaves a row without its answer, and
leaves `token_type_ids` as long as the uncut row (a row the model's forward cannot take). Patched, every
row fits with whole image runs, one pixel_values entry each, `token_type_ids` following the cut, the
chat frame and answer tokens; an image that does not fit goes to the policy.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import require
from tests.fixtures.swift_gemma3 import build_tiny_gemma3, image_runs
from tests.fixtures.swift_rows import build_rows
from tests.fixtures.swift_run import max_length_error, sft, template

FAMILY, BUDGET = "gemma3_vision", 128


@pytest.fixture(autouse=True)
def _own_modelscope_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "modelscope"))  # as in test_swift.py


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    require("swift")
    root = tmp_path_factory.mktemp("swift_gemma3")
    return build_tiny_gemma3(str(root / "model")), build_rows(str(root / "data"))[1]


def _encode(tmpl, row):
    try:
        return tmpl.encode(json.loads(json.dumps(row)))
    except max_length_error() as exc:
        return exc


def _soft(tmpl) -> int:
    return tmpl.tokenizer.convert_tokens_to_ids("<image_soft_token>")


def _whole(encoded, tmpl) -> None:
    """Every image run whole, one pixel_values entry per run, token_type_ids one a token, 1 where the
    template's own rule puts it (`processor.image_token_id`: the soft token; from transformers 5.17, whose
    Gemma3Processor calls the placeholder `<start_of_image>` its image token, the template marks that)."""
    ids = encoded["input_ids"]
    pixels = encoded.get("pixel_values")
    assert image_runs(ids, _soft(tmpl)) == [("image", 16)] * (0 if pixels is None else pixels.shape[0])
    assert encoded["token_type_ids"] == [int(t == tmpl.processor.image_token_id) for t in ids]
    assert len(encoded["labels"]) == len(ids)


def test_vanilla_right_breaks_image_runs_and_token_types(gemma3, patched):
    model, rows = gemma3
    import vlpatch

    vlpatch.revert()
    tmpl = template(model, FAMILY, "right", BUDGET)
    soft = _soft(tmpl)
    first, second = _encode(tmpl, rows[0]), _encode(tmpl, rows[1])
    # a run cut apart: soft tokens without their markers (a marker alone from transformers 5.17, where
    # upstream's cut keeps the processor's image token, then `<start_of_image>`)
    assert any(kind == "broken" for kind, _ in image_runs(first["input_ids"], soft))
    assert not any(label != -100 for label in first["labels"])  # no answer left
    assert len(first["token_type_ids"]) > len(first["input_ids"]) == BUDGET  # the uncut row's types
    assert any(kind == "broken" for kind, _ in image_runs(second["input_ids"], soft))  # the second image cut


@pytest.mark.parametrize("strategy", ["right", "left"])
def test_patched_rows_fit_with_whole_image_runs_frame_and_answer(gemma3, patched, tmp_path, strategy):
    model, rows = gemma3
    patched(policy="drop", report=str(tmp_path / "report.jsonl"))
    tmpl = template(model, FAMILY, strategy, BUDGET)
    soft = _soft(tmpl)
    for i in (0, 1, 2, 3, 4):
        encoded = _encode(tmpl, rows[i])
        ids = encoded["input_ids"]
        assert len(ids) <= BUDGET
        _whole(encoded, tmpl)
        answer = [p for p, label in enumerate(encoded["labels"]) if label != -100]
        assert answer, f"row {i} kept no answer"
        text = tmpl.tokenizer.decode(ids)
        assert text.startswith("<bos><start_of_turn>user\n"), text[:60]
        assert tmpl.tokenizer.decode(ids[: answer[0]]).endswith("<start_of_turn>model\n")
    assert image_runs(_encode(tmpl, rows[1])["input_ids"], soft) == [("image", 16)] * 2  # both images stay
    report = [json.loads(line) for line in open(tmp_path / "report.jsonl")]
    assert sorted(r["sample"][:12] for r in report if r["action"] == "truncated") == sorted(
        ["You are a ca", "<image> firs", rows[4]["messages"][0]["content"][:12]])


def test_images_that_do_not_fit_go_to_the_policy(gemma3, patched, tmp_path):
    """At 40 tokens row 1's two images (18 tokens each with their markers) do not fit beside its frame:
    `drop_media` takes the second out with its pixel_values entry, `drop` deletes the row (reported),
    `shrink` cannot make a Gemma 3 image smaller in tokens and deletes it too, `error` stops."""
    model, rows = gemma3
    from vlpatch.errors import SampleError

    patched(policy="drop_media", report=str(tmp_path / "r1.jsonl"))
    tmpl = template(model, FAMILY, "right", 40)
    out = _encode(tmpl, rows[1])
    assert len(out["input_ids"]) == 40 and out["pixel_values"].shape[0] == 1
    _whole(out, tmpl)
    row = [json.loads(line) for line in open(tmp_path / "r1.jsonl")][0]
    assert row["action"] == "media_dropped" and row["media_removed"] == {"image": [1]}

    for policy in ("drop", "shrink"):
        patched(policy=policy, report=str(tmp_path / f"r_{policy}.jsonl"))
        assert isinstance(_encode(template(model, FAMILY, "right", 40), rows[1]), max_length_error())
        row = [json.loads(line) for line in open(tmp_path / f"r_{policy}.jsonl")][0]
        assert row["action"] == "dropped" and row["reason"].startswith("media_exceed_budget")

    patched(policy="error", report=str(tmp_path / "r3.jsonl"))
    with pytest.raises(SampleError, match="first"):
        template(model, FAMILY, "right", 40).encode(json.loads(json.dumps(rows[1])))


@pytest.mark.slow
def test_swift_sft_trains_gemma3_rows_cut_around_images(gemma3, tmp_path):
    """`swift sft` on the tiny Gemma 3 with VLPATCH=1 and `right` at 128: the rows cut around one and two
    images train (the model's forward takes each image's pixel_values against its soft tokens), loss > 0.
    (Vanilla, run once by hand: an IndexError in Gemma 3's forward at the first step, on the cut row.)"""
    model, rows = gemma3
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(rows[i]) + "\n" for i in (0, 1, 3)))
    report = tmp_path / "report.jsonl"
    proc = sft(model, str(data), tmp_path, "right", {"VLPATCH": "1", "VLPATCH_REPORT": str(report)}, BUDGET, FAMILY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(r["index"] for r in map(json.loads, open(report)) if r["action"] == "truncated") == [0, 1]
    logged = [json.loads(line) for line in open(next(tmp_path.glob("v*/logging.jsonl")))]
    losses = [float(entry["loss"]) for entry in logged if "loss" in entry]
    assert len(losses) == 3 and all(loss > 0 for loss in losses), losses

