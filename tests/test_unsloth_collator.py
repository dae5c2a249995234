"""The real `unsloth_zoo.vision_utils.UnslothVisionDataCollator` of the installed unsloth_zoo on images,
vanilla and patched: a tiny offline Qwen2-VL (real processor) and the real processors of Qwen3-VL,
Gemma 3, Mllama and Pixtral (`unsloth_collator`, tests/conftest.py): every image of an example taken,
truncation keeping image runs whole, the policies, the chat frame a cut row keeps, a few real optimizer
steps, `filter_dataset`. Prompt/completion examples: test_unsloth_prompt_completion.py; videos:
test_unsloth_video.py; Gemma 3n images and audio: test_unsloth_gemma3n.py.

Import recipe for CPU machines: tests/fixtures/unsloth_import.py.
"""

import inspect
import json

import pytest

import vlpatch

from tests.fixtures.chat_frame import QWEN_SYSTEM_FRAME, qwen_frame, unpadded
from tests.fixtures.tiny_models import image, long_text
from tests.fixtures.unsloth_collators import check_rows, example, images, unsloth_status

pytestmark = pytest.mark.unsloth


def test_vanilla_first_image_only_fails_and_patch_takes_every_image(unsloth_collator, patched):
    batch_in = [example(2), example(1)]
    if unsloth_collator.version < unsloth_collator.version.__class__("2025.12.4"):
        with pytest.raises(Exception) as info:
            unsloth_collator.collator()(batch_in)
        # the image-count mismatch surfaces inside the processor: IndexError (Qwen), ValueError, or
        # StopIteration (Pixtral runs out of images)
        assert isinstance(info.value, (IndexError, ValueError, StopIteration)), repr(info.value)
    st = unsloth_status(patched().status())
    assert st["state"] == "applied", st
    batch = unsloth_collator.collator()([example(2), example(1)])
    assert images(check_rows(unsloth_collator, batch)) == 3


def test_placeholder_count_differs_from_images_names_the_example(unsloth_collator, patched):
    import vlpatch

    st = unsloth_status(patched().status())
    if "applied" not in st["parts"]["multi_image"]:
        pytest.skip(f"multi-image is native in unsloth_zoo {unsloth_collator.version}: upstream's own check applies")
    with pytest.raises(vlpatch.SampleError, match=r"batch example 1: image placeholders and images differ \(2 placeholder\(s\), 1 image\(s\)\)"):
        unsloth_collator.collator()([example(1), example(1, n_placeholders=2)])


def test_vanilla_truncation_cuts_the_image_run(unsloth_collator):
    with pytest.raises(Exception) as info:
        batch = unsloth_collator.collator(100)([example(1, words_before=150), example(1)])
        check_rows(unsloth_collator, batch)  # an old transformers may not raise: the rows are then broken
    assert "image" in str(info.value).lower() or isinstance(info.value, AssertionError), repr(info.value)



def test_a_token_table_that_does_not_match_the_processor_refuses_to_cut(unsloth_collator, patched, tmp_path, monkeypatch):
    # what transformers 5.17 did to Gemma 3 (its processor's image_token became the placeholder): the
    # table finds no image run where the processor put one. vlpatch must refuse, not cut blindly.
    from tests.fixtures import matrix_copy

    def mismatch(data):  # the processor's layout in the matrix's `processors:` section, which the patches name
        table = data["processors"][type(unsloth_collator.processor).__name__]["media_tokens"]["image"]
        table.pop("start", None)
        table.pop("end", None)
        table["body"] = "<|endoftext|>" if unsloth_collator.family != "gemma3" else "<eos>"  # a token that is not the image's

    monkeypatch.setenv("VLPATCH_MATRIX", matrix_copy.edited_copy(tmp_path, mismatch))
    patched(report=str(tmp_path / "r.jsonl"))
    with pytest.raises(vlpatch_error()) as info:
        unsloth_collator.collator(100)([example(1, words_before=150), example(1, words_before=1, words_after=1)])
    assert "will not cut it blindly" in str(info.value) and type(unsloth_collator.processor).__name__ in str(info.value)


def vlpatch_error():
    from vlpatch import VLPatchError

    return VLPatchError

def test_patched_truncation_keeps_runs_whole_and_reports(unsloth_collator, patched, tmp_path):
    long_one, short_one = example(1, words_before=150), example(1, words_before=1, words_after=1)
    full = unsloth_collator.collator()([long_one, short_one])
    patched(report=str(tmp_path / "r.jsonl"))
    batch = unsloth_collator.collator(100)([example(1, words_before=150), example(1, words_before=1, words_after=1)])
    check_rows(unsloth_collator, batch, budget=100)
    (full_run,) = check_rows(unsloth_collator, full)[0]
    short_full = full["input_ids"][1][full["attention_mask"][1].bool()].tolist()
    short_now = batch["input_ids"][1][batch["attention_mask"][1].bool()].tolist()
    assert len(short_full) <= 100
    assert short_now == short_full, "the example that fits is untouched"
    (row,) = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert row["action"] == "truncated" and row["index"] == 0 and row["tokens_after"] <= 100
    assert row["media_tokens"] == row["media_tokens_after"] == full_run.stop - full_run.start


def test_media_that_alone_exceed_max_seq_length(unsloth_collator, patched, tmp_path):
    from vlpatch.integrations.unsloth import EmptyBatchError, filter_dataset

    big = unsloth_collator.big
    patched(report=str(tmp_path / "r.jsonl"))
    batch = unsloth_collator.collator(100)([example(**big), example(1, words_before=1, words_after=1)])
    assert batch["input_ids"].shape[0] == 1 and images(check_rows(unsloth_collator, batch, budget=100)) == 1
    rows = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [(r["index"], r["action"]) for r in rows] == [(0, "dropped")]
    with pytest.raises(EmptyBatchError, match="every example of this batch was dropped.*filter_dataset"):
        unsloth_collator.collator(100)([example(**big)])
    small = example(1, words_before=1, words_after=1)
    kept = filter_dataset([small, example(**big), small], unsloth_collator.collator(100))
    assert len(kept) == 2 and all(len(k["images"]) == 1 for k in kept)
    last = json.loads((tmp_path / "r.jsonl").read_text().splitlines()[-1])
    assert (last["index"], last["stage"], last["action"]) == (1, "filter_dataset", "dropped"), "names the dataset index"

    patched(policy="drop_media", report=str(tmp_path / "r.jsonl"))
    batch = unsloth_collator.collator(100)([example(**big), example(1, words_before=1, words_after=1)])
    if unsloth_collator.family == "mllama":  # pixel tensors per row ([B, max_images, ...]): the example leaves whole
        assert batch["input_ids"].shape[0] == 1 and batch["pixel_values"].shape[0] == 1
        check_rows(unsloth_collator, batch, budget=100)
        last = json.loads((tmp_path / "r.jsonl").read_text().splitlines()[-1])
        assert last["action"] == "dropped" and "keeps images per row" in last["reason"], last
        return
    assert batch["input_ids"].shape[0] == 2, "no example dropped"
    kept = images(check_rows(unsloth_collator, batch, budget=100))
    assert 1 <= kept < big["n_images"] + 1, "trailing images of example 0 left, example 1 kept its own"

    patched(policy="error")
    import vlpatch

    with pytest.raises(vlpatch.SampleError, match="batch example 0: media do not fit"):
        unsloth_collator.collator(100)([example(**big), example(1, words_before=1, words_after=1)])


def test_a_few_optimizer_steps_on_patched_batches(unsloth_collator, tiny_qwen2vl_model, patched):
    import torch

    if unsloth_collator.family != "qwen2_vl":
        pytest.skip("the tiny trainable model is a Qwen2-VL")
    patched()
    budget = 100 if unsloth_collator.truncates else None  # the releases before 2025.3.11 never cut: every image, whole rows
    collator = unsloth_collator.collator(budget)
    tiny_qwen2vl_model.train()
    opt = torch.optim.SGD(tiny_qwen2vl_model.parameters(), lr=1e-3)
    losses = []
    for step in range(3):
        batch = collator([example(2 - step % 2, words_before=80), example(1)])
        check_rows(unsloth_collator, batch, budget=budget)
        out = tiny_qwen2vl_model(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses


@pytest.mark.parametrize("policy", ["drop", "drop_media"])
def test_a_cut_row_keeps_its_chat_frame(unsloth_collator, patched, policy, tmp_path):
    """A row whose image takes nearly all of max_seq_length keeps its system block and user header beside
    the image; where they cannot fit together the policy decides (`drop_media`: the frame stays)."""
    if unsloth_collator.family != "qwen2_vl" or not unsloth_collator.truncates:
        pytest.skip("one family: the frame comes from the template, the same code for all")
    system = long_text(10, 7)

    def framed():
        ex = example(1, words_before=60)
        ex["messages"].insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
        return ex

    uncut = unpadded(unsloth_collator.collator()([framed()]), 0)
    header = unsloth_collator.processor.tokenizer.encode(QWEN_SYSTEM_FRAME.format(system), add_special_tokens=False)
    frame = qwen_frame(unsloth_collator.processor.tokenizer, uncut, system)
    assert frame >= len(header) - 1
    report = tmp_path / "r.jsonl"
    patched(policy=policy, report=str(report))
    for budget, fits in ((66 + frame + 4, True), (66 + frame - 4, False)):
        report.unlink(missing_ok=True)
        batch = unsloth_collator.collator(budget)([framed(), example(1, words_before=1, words_after=1)])
        check_rows(unsloth_collator, batch, budget=budget)
        row = next(r for r in (json.loads(x) for x in report.read_text().splitlines()) if r["index"] == 0)
        if fits:
            assert row["action"] == "truncated" and row["media_tokens_after"] == 66, row
            assert unpadded(batch, 0)[:frame] == uncut[:frame], "the cut row starts with its frame"
        elif policy == "drop":
            assert row["action"] == "dropped" and "beside its chat frame of" in row["reason"], row
        else:
            assert row["action"] == "media_dropped", row
            assert unpadded(batch, 0)[:frame] == uncut[:frame], "the cut row starts with its frame"


def test_shrink_downsizes_the_images_until_the_example_fits(unsloth_collator, tiny_qwen2vl_model, patched, tmp_path):
    """Policy shrink: an example whose images alone exceed max_seq_length is collated again with its
    images downsized until it fits; the pixel tensors are the processor's own for the downsized images
    (runs == tensors), the caller's example is untouched, the report gives each image's sizes and tokens.
    Gemma 3 (a fixed 256 tokens per image) and Mllama (one token per image) cannot gain from a smaller
    image: the fallback (drop) decides, and the reason says so."""
    import torch

    report_path = tmp_path / "r.jsonl"
    patched(policy="shrink", shrink_min_pixels=28 * 28, report=str(report_path))
    big, short = example(**unsloth_collator.big), example(1, words_before=1, words_after=1)
    sizes = [im.size for im in big["images"]]
    batch = unsloth_collator.collator(100)([big, short])
    rows = [json.loads(x) for x in report_path.read_text().splitlines()]
    assert [im.size for im in big["images"]] == sizes, "the caller's example is untouched"
    inline = unsloth_status(vlpatch.status())["id"] == "unsloth.collator_inline"
    if unsloth_collator.family in ("gemma3", "mllama") or (unsloth_collator.family == "pixtral" and inline):
        # Pixtral in the releases that inline the image: upstream's fetch_image makes every image at
        # least 56x56 (its MIN_PIXELS), where Pixtral's six images still need 120 tokens
        assert [(r["index"], r["action"]) for r in rows] == [(0, "dropped")], rows
        assert "shrink_failed" in rows[0]["reason"], rows[0]
        return
    assert batch["input_ids"].shape[0] == 2, "nothing dropped"
    check_rows(unsloth_collator, batch, budget=100)
    (row,) = rows
    assert row["action"] == "shrunk" and row["reason"].startswith("media_shrunk: "), row
    assert row["tokens_before"] > 100 >= row["tokens_after"]
    assert len(row["media_resized"]) == unsloth_collator.big["n_images"]
    for item in row["media_resized"]:
        assert item["before"] == list(sizes[0]) and item["tokens_after"] < item["tokens_before"], item
    if unsloth_collator.family == "qwen2_vl":  # the tiny model trains on shrunk batches
        tiny_qwen2vl_model.train()
        opt = torch.optim.SGD(tiny_qwen2vl_model.parameters(), lr=1e-3)
        collator = unsloth_collator.collator(100)
        for step in range(2):
            batch = collator([example(**unsloth_collator.big), example(1, words_before=80)])
            check_rows(unsloth_collator, batch, budget=100)
            out = tiny_qwen2vl_model(**batch)
            assert torch.isfinite(out.loss)
            out.loss.backward()
            opt.step()
            opt.zero_grad()


def test_shrink_measures_the_media_only_when_they_do_not_fit(unsloth_collator, patched, tmp_path, monkeypatch):
    """Policy shrink reads an example's media sizes (a video file: through upstream's reader) only when
    the media that must stay do not fit: a row whose text alone is cut costs it nothing."""
    from vlpatch.integrations import _collator

    calls = []
    real = _collator.CollatorPatch.shrink_items
    monkeypatch.setattr(_collator.CollatorPatch, "shrink_items", lambda *a: calls.append(1) or real(*a))
    patched(policy="shrink", shrink_min_pixels=28 * 28, report=str(tmp_path / "r.jsonl"))
    batch = unsloth_collator.collator(100)([example(1, words_before=80), example(1)])
    check_rows(unsloth_collator, batch, budget=100)
    rows = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert rows and {r["action"] for r in rows} == {"truncated"} and calls == [], (rows, calls)
    unsloth_collator.collator(100)([example(**unsloth_collator.big), example(1, words_before=1, words_after=1)])
    assert calls == [1], "measured once, when they do not fit"


def two_turns(words_first=5, words_second=60):
    """A conversation of two turns, one image in each user turn (`images` column, in order)."""
    def user(words, seed):
        return {"role": "user", "content": [{"type": "text", "text": long_text(words, seed)}, {"type": "image"}]}

    def assistant(text):
        return {"role": "assistant", "content": [{"type": "text", "text": text}]}

    return {"messages": [user(words_first, 1), assistant("a red square"), user(words_second, 2), assistant("a blue one")],
            "images": [image(224, seed=1), image(224, seed=2)]}


def test_a_later_turns_image_leaves_with_the_cut(unsloth_collator, patched, tmp_path):
    """Two turns, one 66-token image each, max_seq_length 100: the first turn's image fits, the second
    cannot: it leaves with the part of the row the cut removes (the example is kept, truncated, and the
    report names the image), as LLaMA-Factory's turn budget does, instead of the policy dropping it."""
    if unsloth_collator.family != "qwen2_vl":
        pytest.skip("the arithmetic of this example is the tiny Qwen2-VL's (66 tokens per image)")
    report_path = tmp_path / "r.jsonl"
    patched(report=str(report_path))
    batch = unsloth_collator.collator(100)([two_turns(), example(1, words_before=1, words_after=1)])
    assert batch["input_ids"].shape[0] == 2, "nothing dropped"
    assert images(check_rows(unsloth_collator, batch, budget=100)) == 2, "row 0 keeps its first turn's image, row 1 its own"
    (row,) = [json.loads(x) for x in report_path.read_text().splitlines()]
    assert (row["index"], row["action"], row["media_removed"]) == (0, "truncated", {"image": [1]}), row
    assert row["reason"].startswith("media_left_with_turn: image#1"), row
    # the first turn's own media still go to the policy: two images in the first turn do not fit
    first_heavy = example(2, words_before=5)
    batch = unsloth_collator.collator(100)([first_heavy, example(1, words_before=1, words_after=1)])
    last = json.loads(report_path.read_text().splitlines()[-1])
    assert last["action"] == "dropped" and last["reason"].startswith("media_exceed_budget"), last


def test_uncovered_processor_is_left_to_upstream(vision_utils, tiny_qwen2vl_model, patched, tmp_path):
    """A processor vlpatch has no token table for (LLaVA here) gets upstream's own collation, unchanged."""
    import torch

    from tests.fixtures import tiny_processors

    try:
        _, processor, _, _ = tiny_processors.llava(str(tmp_path / "llava"))
    except (ImportError, AttributeError, TypeError) as exc:
        pytest.skip(f"this transformers cannot build a llava processor: {exc!r}")
    processor.chat_template = (
        "{% for message in messages %}{{ message['role'] }}: {% for c in message['content'] %}"
        "{% if c['type'] == 'image' %}<image>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
    )
    rows = [example(1, words_before=3, side=56), example(1, words_before=3, side=56)]
    accepted = inspect.signature(vision_utils.UnslothVisionDataCollator.__init__).parameters  # before 2025.3.11: no budget
    options = {k: v for k, v in {"max_seq_length": 40, "resize": "max"}.items() if k in accepted}
    make = lambda: vision_utils.UnslothVisionDataCollator(tiny_qwen2vl_model, processor, **options)  # noqa: E731
    vanilla = make()(rows)
    patched()
    out = make()(rows)
    assert set(out.keys()) == set(vanilla.keys())
    for key, value in vanilla.items():
        if torch.is_tensor(value):
            assert torch.equal(out[key], value), key


def test_filter_dataset_removes_bad_input_up_to_max_bad(unsloth_collator, patched, tmp_path):
    """Bad input (placeholders and images that differ in number) is removed and reported by
    filter_dataset; above VLPATCH_MAX_BAD of the examples it stops, naming the count and the first."""
    from vlpatch.integrations.unsloth import filter_dataset

    good = [example(1, words_before=1, words_after=1) for _ in range(9)]
    bad = example(1, words_before=1, words_after=1, n_placeholders=2)
    patched(report=str(tmp_path / "r.jsonl"), max_bad=0.2)
    kept = filter_dataset([*good[:4], bad, *good[4:]], unsloth_collator.collator(1000))
    assert len(kept) == 9
    rows = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [(r["index"], r["action"]) for r in rows] == [(4, "dropped")] and rows[0]["reason"].startswith("bad_input: image placeholders")
    patched(report=str(tmp_path / "r.jsonl"))  # the default 5%: 1 of 10 is too many
    with pytest.raises(vlpatch.VLPatchError, match=r"1 of 10 examples \(10%\) have bad input, more than VLPATCH_MAX_BAD \(5%\)"):
        filter_dataset([*good[:4], bad, *good[4:]], unsloth_collator.collator(1000))
    patched(report=str(tmp_path / "r.jsonl"), policy="error")
    with pytest.raises(vlpatch.SampleError, match="placeholders"):
        filter_dataset([bad], unsloth_collator.collator(1000))
