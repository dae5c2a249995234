"""The real `unsloth_zoo.vision_utils.UnslothVisionDataCollator` of the installed unsloth_zoo, vanilla
and patched, on a tiny offline Qwen2-VL (real processor), then a few real optimizer steps; images of the
other families' real processors; Qwen2.5-VL and Qwen3-VL videos (each batch also through a tiny real
model of the family) and Gemma 3n images and audio (tests/fixtures/unsloth_families.py).

Import recipe for CPU machines: tests/fixtures/unsloth_import.py.
"""

import inspect
import json
from collections import Counter

import pytest

import vlpatch

from tests.conftest import require
from tests.fixtures.chat_frame import QWEN_SYSTEM_FRAME, qwen_frame, unpadded
from tests.fixtures.tiny_models import long_text

pytestmark = pytest.mark.unsloth


@pytest.fixture(scope="module")
def vu():
    require("unsloth_zoo")
    from tests.fixtures.unsloth_import import import_vision_utils

    return import_vision_utils()


@pytest.fixture(scope="module")
def model(tiny_qwen2vl):
    from transformers import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration.from_pretrained(tiny_qwen2vl)


GEMMA3_TEMPLATE = (
    "{% for message in messages %}<start_of_turn>{{ message['role'] }}\n{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<start_of_image>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<end_of_turn>\n{% endfor %}"
)


MLLAMA_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|image|>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
)


PIXTRAL_TEMPLATE = MLLAMA_TEMPLATE.replace("<|image|>", "[IMG]")


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen3_vl", "gemma3", "mllama", "pixtral"])
def uz(request, vu, model, tiny_qwen2vl, tmp_path_factory):
    """The real collator around a family's real processor (Qwen2-VL: the tiny model's own)."""
    from packaging.version import Version
    from transformers import AutoProcessor

    from tests.fixtures import tiny_processors
    from tests.fixtures.tiny_models import CHAT_TEMPLATE
    from vlpatch import engine

    class UZ:
        pass

    uz = UZ()
    uz.vu, uz.family = vu, request.param
    uz.version = Version(engine.installed_version("unsloth_zoo"))
    marks = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")
    if request.param == "qwen2_vl":
        uz.processor = AutoProcessor.from_pretrained(tiny_qwen2vl)
    else:
        try:
            built = getattr(tiny_processors, request.param)(str(tmp_path_factory.mktemp("p")))
        except (ImportError, AttributeError, TypeError) as exc:
            pytest.skip(f"this transformers cannot build a {request.param} processor: {exc!r}")
        # a builder returns a Family (processor, media tokens, ...) or the older 4-tuple
        uz.processor, media = (built.proc, built.media) if hasattr(built, "proc") else (built[1], built[3])
        templates = {"gemma3": GEMMA3_TEMPLATE, "mllama": MLLAMA_TEMPLATE, "pixtral": PIXTRAL_TEMPLATE}
        uz.processor.chat_template = templates.get(request.param, CHAT_TEMPLATE)
        if request.param == "gemma3":
            marks = (media[0], media[2], media[1])  # boi, image soft token, eoi
        if request.param == "mllama":
            marks = (None, media[0], None)  # one <|image|> token per image, no boundaries
        if request.param == "pixtral":
            marks = (None, media[0], media[2])  # rows of [IMG] closed by [IMG_BREAK], the last by [IMG_END]
            uz.brk = uz.processor.tokenizer.convert_tokens_to_ids(media[1])
    tok = uz.processor.tokenizer
    uz.start, uz.pad, uz.end = (tok.convert_tokens_to_ids(t) if t else None for t in marks)
    uz.boundaries = {"mllama": 0, "pixtral": 0}.get(request.param, 2)
    # examples whose images alone exceed max_seq_length 100: one large image (Qwen), or six of 18 tokens (Gemma 3)
    # Mllama: one token per image, so 120 small images (56 px, one tile each)
    uz.big = {"gemma3": dict(n_images=6), "pixtral": dict(n_images=6), "mllama": dict(n_images=120, side=56)}.get(
        request.param, dict(n_images=1, side=448)
    )
    # the model is only read for its dtype and max_seq_length by the collator
    accepts = inspect.signature(vu.UnslothVisionDataCollator.__init__).parameters
    uz.truncates = "max_seq_length" in accepts  # from 2025.3.11; the releases before never cut

    def collator(max_len=None):
        kwargs = {"resize": "max"} if "resize" in accepts else {}
        if uz.truncates:
            kwargs["max_seq_length"] = max_len
        elif max_len is not None:
            pytest.skip(f"unsloth_zoo {uz.version}: its collator has no max_seq_length, it never cuts")
        return vu.UnslothVisionDataCollator(model, uz.processor, **kwargs)

    uz.collator = collator
    return uz


def image_tokens(batch):
    """Body tokens per image of the batch, from the pixel tensors: Qwen-VL grids, Gemma 3's fixed 16,
    Mllama's one token per image (images counted from aspect_ratio_ids: 0 marks an empty slot)."""
    if "image_grid_thw" in batch:
        return batch["image_grid_thw"].prod(dim=-1).div(4).long().tolist()
    if "aspect_ratio_ids" in batch:
        return [1] * int((batch["aspect_ratio_ids"] != 0).sum())
    if "image_sizes" in batch:  # Pixtral, patch 16: rows x (columns + one break or end token)
        return [int(h) // 16 * (int(w) // 16 + 1) for h, w in batch["image_sizes"].tolist()]
    return [16] * batch["pixel_values"].shape[0]


def unsloth_status(rows):
    """The Unsloth patch in force for the installed release (unsloth.collator or unsloth.collator_inline)."""
    (row,) = [r for r in rows if r["id"].startswith("unsloth.") and r["state"] != "skipped"]
    return row


def image(side=224, seed=0):
    from PIL import Image

    return Image.new("RGB", (side, side), (40 * seed % 255, 100, 150))


def example(n_images, words_before=5, words_after=3, n_placeholders=None, side=224):
    """A conversation whose user turn is text, then the images, then a little text; `images` column."""
    n_placeholders = n_images if n_placeholders is None else n_placeholders
    content = [{"type": "text", "text": long_text(words_before, 1)}]
    content += [{"type": "image"} for _ in range(n_placeholders)]
    content += [{"type": "text", "text": long_text(words_after, 2)}]
    return {
        "messages": [
            {"role": "user", "content": content},
            {"role": "assistant", "content": [{"type": "text", "text": "a red square"}]},
        ],
        "images": [image(side, seed=k) for k in range(n_images)],
    }


def check_rows(uz, batch, budget=None):
    """Every row's image runs are whole and match the pixel tensors, in order; labels aligned."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    grids = image_tokens(batch)
    g = 0
    for i in range(ids.shape[0]):
        row = ids[i][mask[i].bool()].tolist()
        if budget is not None:
            assert len(row) <= budget
        if uz.family == "pixtral":  # runs of [IMG] / [IMG_BREAK] closed by [IMG_END]
            j = 0
            while j < len(row):
                if row[j] == uz.pad:
                    k = j
                    while k < len(row) and row[k] in (uz.pad, uz.brk):
                        k += 1
                    assert k < len(row) and row[k] == uz.end, f"row {i}: image run at {j} is cut"
                    assert k - j + 1 == grids[g], f"row {i}: run of {k - j + 1} tokens for an image of {grids[g]}"
                    g += 1
                    j = k
                j += 1
            continue
        if uz.start is None:  # Mllama: one token per image, the row's images in its own pixel slots
            assert row.count(uz.pad) == int((batch["aspect_ratio_ids"][i] != 0).sum()), f"row {i}"
            g += row.count(uz.pad)
            continue
        j = 0
        while j < len(row):
            if row[j] == uz.start:
                k = j + 1
                while k < len(row) and row[k] == uz.pad:
                    k += 1
                assert k < len(row) and row[k] == uz.end, f"row {i}: image run at {j} is cut"
                assert k - j - 1 == grids[g], f"row {i}: run of {k - j - 1} tokens for an image of {grids[g]}"
                g += 1
                j = k
            j += 1
    assert g == len(grids), "one whole run per image of the batch"
    assert batch["labels"].shape == ids.shape
    if "image_grid_thw" in batch:
        assert batch["pixel_values"].shape[0] == sum(grids) * 4


def test_vanilla_first_image_only_fails_and_patch_takes_every_image(uz, patched):
    batch_in = [example(2), example(1)]
    if uz.version < uz.version.__class__("2025.12.4"):
        with pytest.raises(Exception) as info:
            uz.collator()(batch_in)
        # the image-count mismatch surfaces inside the processor: IndexError (Qwen), ValueError, or
        # StopIteration (Pixtral runs out of images)
        assert isinstance(info.value, (IndexError, ValueError, StopIteration)), repr(info.value)
    st = unsloth_status(patched().status())
    assert st["state"] == "applied", st
    batch = uz.collator()([example(2), example(1)])
    assert len(image_tokens(batch)) == 3
    check_rows(uz, batch)


def test_placeholder_count_differs_from_images_names_the_example(uz, patched):
    import vlpatch

    st = unsloth_status(patched().status())
    if "applied" not in st["parts"]["multi_image"]:
        pytest.skip(f"multi-image is native in unsloth_zoo {uz.version}: upstream's own check applies")
    with pytest.raises(vlpatch.SampleError, match=r"batch example 1: image placeholders and images differ \(2 placeholder\(s\), 1 image\(s\)\)"):
        uz.collator()([example(1), example(1, n_placeholders=2)])


def test_vanilla_truncation_cuts_the_image_run(uz):
    with pytest.raises(Exception) as info:
        batch = uz.collator(100)([example(1, words_before=150), example(1)])
        check_rows(uz, batch)  # an old transformers may not raise: the rows are then broken
    assert "image" in str(info.value).lower() or isinstance(info.value, AssertionError), repr(info.value)



def test_a_token_table_that_does_not_match_the_processor_refuses_to_cut(uz, patched, tmp_path, monkeypatch):
    # what transformers 5.17 did to Gemma 3 (its processor's image_token became the placeholder): the
    # table finds no image run where the processor put one. vlpatch must refuse, not cut blindly.
    from tests.fixtures import matrix_copy

    def mismatch(data):  # the processor's layout in the matrix's `processors:` section, which the patches name
        table = data["processors"][type(uz.processor).__name__]["media_tokens"]["image"]
        table.pop("start", None)
        table.pop("end", None)
        table["body"] = "<|endoftext|>" if uz.family != "gemma3" else "<eos>"  # a token that is not the image's

    monkeypatch.setenv("VLPATCH_MATRIX", matrix_copy.edited_copy(tmp_path, mismatch))
    patched(report=str(tmp_path / "r.jsonl"))
    with pytest.raises(vlpatch_error()) as info:
        uz.collator(100)([example(1, words_before=150), example(1, words_before=1, words_after=1)])
    assert "will not cut it blindly" in str(info.value) and type(uz.processor).__name__ in str(info.value)


def vlpatch_error():
    from vlpatch import VLPatchError

    return VLPatchError

def test_patched_truncation_keeps_runs_whole_and_reports(uz, patched, tmp_path):
    long_one, short_one = example(1, words_before=150), example(1, words_before=1, words_after=1)
    full = uz.collator()([long_one, short_one])
    patched(report=str(tmp_path / "r.jsonl"))
    batch = uz.collator(100)([example(1, words_before=150), example(1, words_before=1, words_after=1)])
    check_rows(uz, batch, budget=100)
    short_full = full["input_ids"][1][full["attention_mask"][1].bool()].tolist()
    short_now = batch["input_ids"][1][batch["attention_mask"][1].bool()].tolist()
    assert len(short_full) <= 100
    assert short_now == short_full, "the example that fits is untouched"
    (row,) = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert row["action"] == "truncated" and row["index"] == 0 and row["tokens_after"] <= 100
    assert row["media_tokens"] == row["media_tokens_after"] == image_tokens(full)[0] + uz.boundaries


def test_media_that_alone_exceed_max_seq_length(uz, patched, tmp_path):
    from vlpatch.integrations.unsloth import EmptyBatchError, filter_dataset

    big = uz.big
    patched(report=str(tmp_path / "r.jsonl"))
    batch = uz.collator(100)([example(**big), example(1, words_before=1, words_after=1)])
    assert batch["input_ids"].shape[0] == 1 and len(image_tokens(batch)) == 1
    check_rows(uz, batch, budget=100)
    rows = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [(r["index"], r["action"]) for r in rows] == [(0, "dropped")]
    with pytest.raises(EmptyBatchError, match="every example of this batch was dropped.*filter_dataset"):
        uz.collator(100)([example(**big)])
    small = example(1, words_before=1, words_after=1)
    kept = filter_dataset([small, example(**big), small], uz.collator(100))
    assert len(kept) == 2 and all(len(k["images"]) == 1 for k in kept)
    last = json.loads((tmp_path / "r.jsonl").read_text().splitlines()[-1])
    assert (last["index"], last["stage"], last["action"]) == (1, "filter_dataset", "dropped"), "names the dataset index"

    patched(policy="drop_media", report=str(tmp_path / "r.jsonl"))
    batch = uz.collator(100)([example(**big), example(1, words_before=1, words_after=1)])
    if uz.family == "mllama":  # pixel tensors per row ([B, max_images, ...]): the example leaves whole
        assert batch["input_ids"].shape[0] == 1 and batch["pixel_values"].shape[0] == 1
        check_rows(uz, batch, budget=100)
        last = json.loads((tmp_path / "r.jsonl").read_text().splitlines()[-1])
        assert last["action"] == "dropped" and "keeps images per row" in last["reason"], last
        return
    assert batch["input_ids"].shape[0] == 2, "no example dropped"
    assert 1 <= len(image_tokens(batch)) < big["n_images"] + 1, "trailing images of example 0 left, example 1 kept its own"
    check_rows(uz, batch, budget=100)

    patched(policy="error")
    import vlpatch

    with pytest.raises(vlpatch.SampleError, match="batch example 0: media do not fit"):
        uz.collator(100)([example(**big), example(1, words_before=1, words_after=1)])


def test_a_few_optimizer_steps_on_patched_batches(uz, model, patched):
    import torch

    if uz.family != "qwen2_vl":
        pytest.skip("the tiny trainable model is a Qwen2-VL")
    patched()
    budget = 100 if uz.truncates else None  # the releases before 2025.3.11 never cut: every image, whole rows
    collator = uz.collator(budget)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    losses = []
    for step in range(3):
        batch = collator([example(2 - step % 2, words_before=80), example(1)])
        check_rows(uz, batch, budget=budget)
        out = model(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses


@pytest.mark.parametrize("policy", ["drop", "drop_media"])
def test_a_cut_row_keeps_its_chat_frame(uz, patched, policy, tmp_path):
    """A row whose image takes nearly all of max_seq_length keeps its system block and user header beside
    the image; where they cannot fit together the policy decides (`drop_media`: the frame stays)."""
    if uz.family != "qwen2_vl" or not uz.truncates:
        pytest.skip("one family: the frame comes from the template, the same code for all")
    system = long_text(10, 7)

    def framed():
        ex = example(1, words_before=60)
        ex["messages"].insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
        return ex

    uncut = unpadded(uz.collator()([framed()]), 0)
    header = uz.processor.tokenizer.encode(QWEN_SYSTEM_FRAME.format(system), add_special_tokens=False)
    frame = qwen_frame(uz.processor.tokenizer, uncut, system)
    assert frame >= len(header) - 1
    report = tmp_path / "r.jsonl"
    patched(policy=policy, report=str(report))
    for budget, fits in ((66 + frame + 4, True), (66 + frame - 4, False)):
        report.unlink(missing_ok=True)
        batch = uz.collator(budget)([framed(), example(1, words_before=1, words_after=1)])
        check_rows(uz, batch, budget=budget)
        row = next(r for r in (json.loads(x) for x in report.read_text().splitlines()) if r["index"] == 0)
        if fits:
            assert row["action"] == "truncated" and row["media_tokens_after"] == 66, row
            assert unpadded(batch, 0)[:frame] == uncut[:frame], "the cut row starts with its frame"
        elif policy == "drop":
            assert row["action"] == "dropped" and "beside its chat frame of" in row["reason"], row
        else:
            assert row["action"] == "media_dropped", row
            assert unpadded(batch, 0)[:frame] == uncut[:frame], "the cut row starts with its frame"


def test_shrink_downsizes_the_images_until_the_example_fits(uz, model, patched, tmp_path):
    """Policy shrink: an example whose images alone exceed max_seq_length is collated again with its
    images downsized until it fits; the pixel tensors are the processor's own for the downsized images
    (runs == tensors), the caller's example is untouched, the report gives each image's sizes and tokens.
    Gemma 3 (a fixed 256 tokens per image) and Mllama (one token per image) cannot gain from a smaller
    image: the fallback (drop) decides, and the reason says so."""
    import torch

    report_path = tmp_path / "r.jsonl"
    patched(policy="shrink", shrink_min_pixels=28 * 28, report=str(report_path))
    big, short = example(**uz.big), example(1, words_before=1, words_after=1)
    sizes = [im.size for im in big["images"]]
    batch = uz.collator(100)([big, short])
    rows = [json.loads(x) for x in report_path.read_text().splitlines()]
    assert [im.size for im in big["images"]] == sizes, "the caller's example is untouched"
    inline = unsloth_status(vlpatch.status())["id"] == "unsloth.collator_inline"
    if uz.family in ("gemma3", "mllama") or (uz.family == "pixtral" and inline):
        # Pixtral in the releases that inline the image: upstream's fetch_image makes every image at
        # least 56x56 (its MIN_PIXELS), where Pixtral's six images still need 120 tokens
        assert [(r["index"], r["action"]) for r in rows] == [(0, "dropped")], rows
        assert "shrink_failed" in rows[0]["reason"], rows[0]
        return
    assert batch["input_ids"].shape[0] == 2, "nothing dropped"
    check_rows(uz, batch, budget=100)
    (row,) = rows
    assert row["action"] == "shrunk" and row["reason"].startswith("media_shrunk: "), row
    assert row["tokens_before"] > 100 >= row["tokens_after"]
    assert len(row["media_resized"]) == uz.big["n_images"]
    for item in row["media_resized"]:
        assert item["before"] == list(sizes[0]) and item["tokens_after"] < item["tokens_before"], item
    if uz.family == "qwen2_vl":  # the tiny model trains on shrunk batches
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        collator = uz.collator(100)
        for step in range(2):
            batch = collator([example(**uz.big), example(1, words_before=80)])
            check_rows(uz, batch, budget=100)
            out = model(**batch)
            assert torch.isfinite(out.loss)
            out.loss.backward()
            opt.step()
            opt.zero_grad()


def test_shrink_measures_the_media_only_when_they_do_not_fit(uz, patched, tmp_path, monkeypatch):
    """Policy shrink reads an example's media sizes (a video file: through upstream's reader) only when
    the media that must stay do not fit: a row whose text alone is cut costs it nothing."""
    from vlpatch.integrations import _collator

    calls = []
    real = _collator._items
    monkeypatch.setattr(_collator, "_items", lambda *a: calls.append(1) or real(*a))
    patched(policy="shrink", shrink_min_pixels=28 * 28, report=str(tmp_path / "r.jsonl"))
    batch = uz.collator(100)([example(1, words_before=80), example(1)])
    check_rows(uz, batch, budget=100)
    rows = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert rows and {r["action"] for r in rows} == {"truncated"} and calls == [], (rows, calls)
    uz.collator(100)([example(**uz.big), example(1, words_before=1, words_after=1)])
    assert calls == [1], "measured once, when they do not fit"


def two_turns(words_first=5, words_second=60):
    """A conversation of two turns, one image in each user turn (`images` column, in order)."""
    def user(words, seed):
        return {"role": "user", "content": [{"type": "text", "text": long_text(words, seed)}, {"type": "image"}]}

    def assistant(text):
        return {"role": "assistant", "content": [{"type": "text", "text": text}]}

    return {"messages": [user(words_first, 1), assistant("a red square"), user(words_second, 2), assistant("a blue one")],
            "images": [image(224, seed=1), image(224, seed=2)]}


def test_a_later_turns_image_leaves_with_the_cut(uz, patched, tmp_path):
    """Two turns, one 66-token image each, max_seq_length 100: the first turn's image fits, the second
    cannot: it leaves with the part of the row the cut removes (the example is kept, truncated, and the
    report names the image), as LLaMA-Factory's turn budget does, instead of the policy dropping it."""
    if uz.family != "qwen2_vl":
        pytest.skip("the arithmetic of this example is the tiny Qwen2-VL's (66 tokens per image)")
    report_path = tmp_path / "r.jsonl"
    patched(report=str(report_path))
    batch = uz.collator(100)([two_turns(), example(1, words_before=1, words_after=1)])
    assert batch["input_ids"].shape[0] == 2, "nothing dropped"
    check_rows(uz, batch, budget=100)
    assert len(image_tokens(batch)) == 2, "row 0 keeps its first turn's image, row 1 its own"
    (row,) = [json.loads(x) for x in report_path.read_text().splitlines()]
    assert (row["index"], row["action"], row["media_removed"]) == (0, "truncated", {"image": [1]}), row
    assert row["reason"].startswith("media_left_with_turn: image#1"), row
    # the first turn's own media still go to the policy: two images in the first turn do not fit
    first_heavy = example(2, words_before=5)
    batch = uz.collator(100)([first_heavy, example(1, words_before=1, words_after=1)])
    last = json.loads(report_path.read_text().splitlines()[-1])
    assert last["action"] == "dropped" and last["reason"].startswith("media_exceed_budget"), last


def test_uncovered_processor_is_left_to_upstream(vu, model, patched, tmp_path):
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
    make = lambda: vu.UnslothVisionDataCollator(model, processor, max_seq_length=40, resize="max")  # noqa: E731
    vanilla = make()(rows)
    patched()
    out = make()(rows)
    assert set(out.keys()) == set(vanilla.keys())
    for key, value in vanilla.items():
        if torch.is_tensor(value):
            assert torch.equal(out[key], value), key


# --------------------------------------------------------------------------- prompt/completion examples


def pc_example(n_images, words_before=5, words_after=3, n_placeholders=None, side=224):
    """TRL's prompt/completion form: user messages with the image placeholders, an assistant
    completion, and the `images` column."""
    convo = example(n_images, words_before, words_after, n_placeholders, side)
    prompt, completion = convo["messages"]
    return {"prompt": [prompt], "completion": [completion], "images": convo["images"]}


@pytest.fixture
def pc(uz):
    if uz.version < uz.version.__class__("2025.9.3"):
        pytest.skip(f"unsloth_zoo {uz.version} has no prompt/completion path")
    return uz


def test_prompt_completion_every_column_image(pc, patched):
    uz = pc
    st = unsloth_status(patched().status())
    native = "native" in st["parts"]["pc_images"]
    import vlpatch

    vlpatch.revert()
    if not native:
        with pytest.raises(Exception) as info:  # first image only, or the column ignored, or the tuple as the image list
            check_rows(uz, uz.collator()([pc_example(2), pc_example(1)]))
        print(f"vanilla {uz.version}: {info.value!r}")
    patched()
    batch = uz.collator()([pc_example(2), pc_example(1)])
    assert len(image_tokens(batch)) == 3
    check_rows(uz, batch)


def test_prompt_completion_placeholder_count_differs(pc, patched):
    import vlpatch

    st = unsloth_status(patched().status())
    if "applied" not in st["parts"]["pc_images"]:
        pytest.skip(f"prompt/completion images are native in unsloth_zoo {pc.version}")
    with pytest.raises(vlpatch.SampleError, match=r"batch example 1: image placeholders in prompt and completion and images differ \(2 placeholder\(s\), 1 image\(s\)\)"):
        pc.collator()([pc_example(1), pc_example(1, n_placeholders=2)])


def test_prompt_completion_truncation_keeps_runs_whole(pc, patched, tmp_path):
    uz = pc
    with pytest.raises(Exception) as info:
        check_rows(uz, uz.collator(100)([pc_example(1, words_before=150), pc_example(1)]), budget=100)
    print(f"vanilla {uz.version}: {info.value!r}")
    patched(report=str(tmp_path / "r.jsonl"))
    full = uz.collator()([pc_example(1, words_before=150), pc_example(1, words_before=1, words_after=1)])
    batch = uz.collator(100)([pc_example(1, words_before=150), pc_example(1, words_before=1, words_after=1)])
    check_rows(uz, batch, budget=100)
    row_of = lambda b, i: b["input_ids"][i][b["attention_mask"][i].bool()].tolist()  # noqa: E731
    assert row_of(batch, 1) == row_of(full, 1), "the example that fits is untouched"
    tok = uz.processor.tokenizer
    kept, whole = row_of(batch, 0), row_of(full, 0)
    # upstream cuts prompt/completion rows on the padding side: left padding keeps the completion's end
    it = iter(whole)
    assert all(t in it for t in kept), "kept tokens are a subsequence of the uncut row"
    assert (kept[-1] == whole[-1]) if tok.padding_side == "left" else (kept[0] == whole[0])
    (row,) = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert row["action"] == "truncated" and row["index"] == 0 and row["tokens_after"] <= 100


# --------------------------------------------------------------------------- videos (Qwen2.5-VL) and audio (Gemma 3n)
# Upstream hands videos to the processor from 2025.9.14 on (`_extract_images_videos_for_example`: the
# video parts of the messages, only for examples without an `images` column value), audio from a later
# release (`_extract_audio_for_example`: the `audio` column, else the audio parts of the messages; not in
# 2025.11.6, there in 2026.10.9). Earlier releases read a message's video parts and drop them.


def _needs(vu, method: str, what: str):
    if not hasattr(vu.UnslothVisionDataCollator, method):
        from vlpatch import engine

        pytest.skip(
            f"unsloth_zoo {engine.installed_version('unsloth_zoo')} never hands {what} to the processor "
            f"(its collator has no {method})"
        )


class _NS:
    pass


def _report(tmp_path):
    return [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]


def _runs(row, marks: dict, lengths=None, wrapped=False) -> list:
    """(kind, start, stop) of every media run of a row, `marks` {kind: (start, body, end) ids}; an
    AssertionError on a run that is cut or a media token outside any run. `wrapped`: a start token with
    text after it opens an outer pair that an end token after a run closes (transformers 5.17's Qwen3-VL
    leaves the template's `<|vision_start|>` ... `<|vision_end|>` around a video's frame groups); every
    pair must close."""
    starts = {}
    for kind, (s, _, _) in marks.items():
        starts.setdefault(s, []).append(kind)
    inner = {t for s, b, e in marks.values() for t in (b, e)}
    out, j, outer = [], 0, 0
    while j < len(row):
        if row[j] in starts:
            k = j + 1
            kinds = [kind for kind in starts[row[j]] if k < len(row) and row[k] == marks[kind][1]]
            if wrapped and not kinds and not outer:
                outer, j = 1, j + 1
                continue
            assert len(kinds) == 1, f"media run at {j} has no body"
            kind = kinds[0]
            _, body, end = marks[kind]
            while k < len(row) and row[k] == body:
                k += 1
            assert k < len(row) and row[k] == end, f"{kind} run at {j} is cut"
            if lengths and kind in lengths:
                assert k - j - 1 == lengths[kind], f"{kind} run at {j}: {k - j - 1} tokens, not {lengths[kind]}"
            out.append((kind, j, k + 1))
            j = k + 1
            if outer and j < len(row) and row[j] == end:
                outer, j = 0, j + 1
            continue
        assert row[j] not in inner, f"media token at {j} outside any run"
        j += 1
    assert not outer, "an outer media pair is cut"
    return out


def _premise_cut_inside(row, runs, kind: str, which: int = 0):
    """A budget that lands in the middle of the `which`-th run of `kind` (upstream cuts there), and is
    large enough for every media run of the row (so vlpatch keeps them all)."""
    run = [r for r in runs if r[0] == kind][which]
    budget = (run[1] + run[2]) // 2
    media = sum(stop - start for _, start, stop in runs)
    assert run[1] < budget < run[2] and media <= budget < len(row), (runs, budget, len(row))
    return budget


@pytest.fixture(scope="module")
def qv(vu, tmp_path_factory):
    """Qwen2.5-VL with videos: the real collator around a tiny Qwen2.5-VL model, whose forward also checks
    every batch (its video / image tokens must match the features of its pixel tensors)."""
    _needs(vu, "_extract_images_videos_for_example", "a message's videos")
    from tests.fixtures import unsloth_families as F

    try:
        processor, marks = F.qwen2_5_vl(str(tmp_path_factory.mktemp("q25")))
        model = F.tiny_qwen2_5_vl_model(processor)
    except (ImportError, AttributeError, TypeError) as exc:
        pytest.skip(f"this transformers cannot build a Qwen2.5-VL processor and model: {exc!r}")
    qv = _NS()
    qv.processor, qv.model, qv.grouped = processor, model, False
    tok = processor.tokenizer
    qv.marks = {kind: tuple(tok.convert_tokens_to_ids(t) for t in m) for kind, m in marks.items()}
    qv.collator = lambda max_len=None: vu.UnslothVisionDataCollator(model, processor, max_seq_length=max_len, resize="max")
    return qv


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


def check_qwen_rows(qv, batch, budget=None):
    """Every vision run whole and, in batch order, as long as its item's grid says (Qwen3-VL: a video is
    t runs, one per frame group, of h * w / 4 tokens each); the video tensors (pixel_values_videos,
    video_grid_thw, Qwen2.5-VL's second_per_grid_ts) consistent with each other; then the real model's
    forward on the batch."""
    import torch

    seen = {"image": [], "video": []}
    for i in range(batch["input_ids"].shape[0]):
        row = unpadded(batch, i)
        if budget is not None:
            assert len(row) <= budget
        for kind, start, stop in _runs(row, qv.marks, wrapped=qv.grouped):
            seen[kind].append(stop - start - 2)
    for kind, pixels in (("image", "pixel_values"), ("video", "pixel_values_videos")):
        grid = batch.get(f"{kind}_grid_thw")
        if grid is None:
            assert not seen[kind] and pixels not in batch, f"{kind} tokens or pixels without a grid"
            continue
        if kind == "video" and qv.grouped:
            want = [h * w // 4 for t, h, w in grid.tolist() for _ in range(t)]
        else:
            want = grid.prod(dim=-1).div(4).long().tolist()
        assert seen[kind] == want, f"{kind} runs and {kind}_grid_thw differ"
        assert batch[pixels].shape[0] == int(grid.prod(dim=-1).sum())
    if "video_grid_thw" in batch and not qv.grouped:
        assert len(batch["second_per_grid_ts"]) == batch["video_grid_thw"].shape[0]
    else:
        assert "second_per_grid_ts" not in batch
    assert batch["labels"].shape == batch["input_ids"].shape
    with torch.no_grad():
        out = qv.model(**batch)
    assert torch.isfinite(out.loss)


def _patches(batch, kind, items):
    """The pixel rows of the given items (batch-wide indices) of a Qwen batch, concatenated."""
    import torch

    grid = batch[f"{kind}_grid_thw"].prod(dim=-1).tolist()
    pixels = batch["pixel_values" if kind == "image" else "pixel_values_videos"]
    starts = [sum(grid[:k]) for k in range(len(grid) + 1)]
    return torch.cat([pixels[starts[k] : starts[k + 1]] for k in items])


def test_qwen2_5_vl_video_run_kept_whole_where_the_cut_lands_in_it(qv, patched, tmp_path):
    def batch_in():
        # one video in the batch: 2025.10.13 cannot collate two (below)
        return [video_example(words_before=20, n_frames=16, words_after=120), video_example(1, n_videos=0, words_after=1)]

    full = qv.collator()(batch_in())
    row0 = unpadded(full, 0)
    budget = _premise_cut_inside(row0, _runs(row0, qv.marks), "video")
    with pytest.raises(Exception) as info:  # upstream cuts the video run (the processor or the model refuses)
        check_qwen_rows(qv, qv.collator(budget)(batch_in()), budget)
    assert "video" in str(info.value).lower() or isinstance(info.value, AssertionError), repr(info.value)

    patched(report=str(tmp_path / "r.jsonl"))
    batch = qv.collator(budget)(batch_in())
    check_qwen_rows(qv, batch, budget)
    assert batch["video_grid_thw"].tolist() == full["video_grid_thw"].tolist(), "no video lost"
    assert unpadded(batch, 1) == unpadded(full, 1), "the example that fits is untouched"
    (row,) = _report(tmp_path)
    assert (row["index"], row["action"], row["media"]) == (0, "truncated", {"image": 1, "video": 1}), row
    video_tokens = int(full["video_grid_thw"][0].prod()) // 4
    assert row["media_tokens"] == row["media_tokens_after"] == (4 + 2) + (video_tokens + 2), row
    assert row["tokens_after"] <= budget


def _several_videos(vu):
    """Skip where upstream itself cannot collate a batch with several videos: 2025.10.13's collapse_fps
    calls `isclose` without importing it (NameError), whatever vlpatch does."""
    try:
        vu.collapse_fps([1.0, 2.0])
    except NameError as exc:
        from vlpatch import engine

        pytest.skip(f"unsloth_zoo {engine.installed_version('unsloth_zoo')} cannot collate two videos: collapse_fps raises {exc!r}")


def test_qwen2_5_vl_videos_that_do_not_fit_leave_with_their_tensors(vu, qv, patched, tmp_path):
    from vlpatch.integrations.unsloth import EmptyBatchError, filter_dataset

    _several_videos(vu)
    budget = 60

    def big():  # an image (6 tokens) and three videos of 34 tokens: 108 media tokens
        return video_example(words_before=3, n_videos=3, n_frames=16, words_after=3)

    def small(n_videos=1):
        return video_example(words_before=1, n_videos=n_videos, words_after=1)

    full = qv.collator()([big(), small()])  # no cut: videos 0-2 are example 0's, 3 example 1's
    assert full["video_grid_thw"].shape[0] == 4
    assert len(set(full["second_per_grid_ts"].tolist()[:3])) == 3, "the videos are told apart by their rate"

    patched(policy="drop_media", report=str(tmp_path / "r.jsonl"))
    batch = qv.collator(budget)([big(), small()])
    check_qwen_rows(qv, batch, budget)
    assert batch["input_ids"].shape[0] == 2, "no example dropped"
    # example 0 keeps its image and first video, example 1 all of its own: the trailing videos of example 0
    # left video_grid_thw, pixel_values_videos and second_per_grid_ts together
    assert batch["video_grid_thw"].tolist() == full["video_grid_thw"][[0, 3]].tolist()
    assert batch["second_per_grid_ts"].tolist() == full["second_per_grid_ts"][[0, 3]].tolist()
    assert batch["pixel_values_videos"].equal(_patches(full, "video", [0, 3]))
    assert batch["pixel_values"].equal(full["pixel_values"]) and batch["image_grid_thw"].equal(full["image_grid_thw"])
    (row,) = _report(tmp_path)
    assert (row["index"], row["action"], row["media_removed"]) == (0, "media_dropped", {"video": [1, 2]}), row

    patched(policy="drop", report=str(tmp_path / "r.jsonl"))
    batch = qv.collator(budget)([big(), small()])
    check_qwen_rows(qv, batch, budget)
    assert batch["input_ids"].shape[0] == 1 and unpadded(batch, 0) == unpadded(full, 1)
    assert batch["video_grid_thw"].tolist() == full["video_grid_thw"][[3]].tolist()
    assert batch["pixel_values_videos"].equal(_patches(full, "video", [3]))
    assert batch["pixel_values"].equal(_patches(full, "image", [1]))
    assert (_report(tmp_path)[-1]["index"], _report(tmp_path)[-1]["action"]) == (0, "dropped")
    # the only video-carrying example leaves: no video tensor is left behind for the vision tower
    batch = qv.collator(budget)([big(), small(n_videos=0)])
    check_qwen_rows(qv, batch, budget)
    assert "pixel_values_videos" not in batch and "video_grid_thw" not in batch
    with pytest.raises(EmptyBatchError):
        qv.collator(budget)([big()])
    kept = filter_dataset([small(), big(), small()], qv.collator(budget))
    assert len(kept) == 2
    last = _report(tmp_path)[-1]
    assert (last["index"], last["stage"], last["media"]) == (1, "filter_dataset", {"image": 1, "video": 3})

    patched(policy="error")
    import vlpatch

    with pytest.raises(vlpatch.SampleError, match="batch example 0: media do not fit"):
        qv.collator(budget)([big(), small()])


def test_a_video_without_its_placeholder_is_refused_before_the_model(qv, patched, tmp_path, monkeypatch):
    """A chat template that renders no placeholder for video message parts: upstream collates a batch with
    the video's pixels and none of its tokens, and the model's forward pass fails on it ("Video features
    and video tokens do not match"), also for a batch that fits. vlpatch refuses that batch with a clear
    error instead."""
    import vlpatch

    template = qv.processor.chat_template
    assert "video" in template
    # the same template without its video branch: a video part renders as nothing
    monkeypatch.setattr(qv.processor, "chat_template", template.replace("'video'", "'no such part'"))
    examples = [video_example(words_before=1, n_frames=4, words_after=1, image=False)]
    vanilla = qv.collator(10_000)(examples)
    with pytest.raises(Exception):  # transformers 5.6: "... do not match"; 4.57: "torch.cat(): expected a non-empty list"
        qv.model(**{k: v for k, v in vanilla.items() if k != "labels"})
    patched(report=str(tmp_path / "r.jsonl"))
    with pytest.raises(vlpatch.VLPatchError, match=r"0 video run\(s\).*1 video\(s\).*chat template writes no placeholder"):
        qv.collator(10_000)(examples)


def test_qwen2_5_vl_shrink_video_keeps_fewer_frames(qv, patched, tmp_path):
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
    batch = qv.collator(budget)(examples)
    check_qwen_rows(qv, batch, budget)
    assert examples[0]["messages"][0]["content"] == before, "the caller's example is untouched"
    row = next(r for r in _report(tmp_path) if r["index"] == 0)
    assert row["action"] == "shrunk" and row["tokens_after"] <= budget, row
    (item,) = row["media_resized"]
    assert item["item"] == "video#0" and item["frames_before"] == 16 and item["before"] == item["after"] == [56, 56], item
    assert 2 <= item["frames_after"] < 16 and item["tokens_after"] < item["tokens_before"], item
    t, h, w = batch["video_grid_thw"][0].tolist()
    assert (t * 2, h * 14, w * 14) == (item["frames_after"], 56, 56), "upstream read the kept frames"
    frame = len(qv.processor.tokenizer.encode("<|im_start|>user\n", add_special_tokens=False))  # the row's chat frame
    assert item["tokens_after"] + frame + 4 > budget, "two frames more (one temporal patch, 4 tokens) would not fit beside the frame"


def test_qwen2_5_vl_shrink_video_file_through_upstreams_reader(qv, patched, tmp_path, monkeypatch):
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

    full = qv.collator()([example()])
    frames = int(full["video_grid_thw"][0][0]) * 2
    budget = 24
    assert len(unpadded(full, 0)) > budget and frames >= 8, "too long as it comes"
    patched(report=str(tmp_path / "r.jsonl"), policy="shrink", shrink_min_pixels=56 * 56, shrink_min_frames=2)
    examples = [example()]
    batch = qv.collator(budget)(examples)
    check_qwen_rows(qv, batch, budget)
    assert examples == [example()], "the caller's example is untouched"
    (row,) = _report(tmp_path)
    assert row["action"] == "shrunk" and row["tokens_after"] <= budget, row
    (item,) = row["media_resized"]
    assert item["item"] == "video#0" and item["frames_before"] == frames and 2 <= item["frames_after"] < frames, item
    assert int(batch["video_grid_thw"][0][0]) * 2 == item["frames_after"], "upstream read that many frames"


# Gemma 3n: images from the `images` column, audio clips from the `audio` column (a datasets.Audio dict
# each); one `\n\n<start_of_X> <X_soft_token> x n <end_of_X>\n\n` run per item (16 image / 20 audio tokens)


@pytest.fixture(scope="module")
def g3n(vu, model, tmp_path_factory):
    from tests.fixtures import unsloth_families as F

    try:
        processor, marks = F.gemma3n(str(tmp_path_factory.mktemp("g3n")))
    except (ImportError, AttributeError, TypeError) as exc:
        pytest.skip(f"this transformers cannot build a Gemma 3n processor: {exc!r}")
    g = _NS()
    g.vu, g.processor = vu, processor
    tok = processor.tokenizer
    g.marks = {kind: tuple(tok.convert_tokens_to_ids(t) for t in m) for kind, m in marks.items()}
    g.lengths = {"image": processor.image_seq_length, "audio": processor.audio_seq_length}
    # the model is only read for its dtype and sizes by the collator
    g.collator = lambda max_len=None: vu.UnslothVisionDataCollator(model, processor, max_seq_length=max_len, resize="max")
    return g


@pytest.fixture
def g3n_audio(g3n):
    _needs(g3n.vu, "_extract_audio_for_example", "audio")
    return g3n


def gemma3n_example(words_before=5, n_images=1, n_audio=0, words_after=3, audio_first=False, seed=0):
    """Text, the images and audio clips (audio first where asked), text; `images` and `audio` columns.
    Clip k lasts 0.2 + 0.1 k s (seed shifts k), so each clip's input_features_mask sum tells it apart."""
    from tests.fixtures.unsloth_families import clip

    images = [{"type": "image"}] * n_images
    audio = [{"type": "audio"}] * n_audio
    content = [{"type": "text", "text": long_text(words_before, 1)}]
    content += (audio + images) if audio_first else (images + audio)
    content += [{"type": "text", "text": long_text(words_after, 2)}]
    out = {
        "messages": [
            {"role": "user", "content": [dict(c) for c in content]},
            {"role": "assistant", "content": [{"type": "text", "text": "a red square"}]},
        ],
        "images": [image(56, seed=seed + k) for k in range(n_images)],
    }
    if n_audio:
        out["audio"] = [clip(0.2 + 0.1 * (seed + k), seed=seed + k) for k in range(n_audio)]
    return out


def check_gemma3n_rows(g, batch, budget=None):
    """Every image / audio run whole and of its fixed length; one pixel_values entry per image run and
    one input_features / input_features_mask entry per audio run; token_type_ids aligned (1 on image
    soft tokens, 3 on audio soft tokens, as the processor writes them)."""
    counts = Counter()
    for i in range(batch["input_ids"].shape[0]):
        row = unpadded(batch, i)
        if budget is not None:
            assert len(row) <= budget
        counts.update(kind for kind, _, _ in _runs(row, g.marks, g.lengths))
        types = batch["token_type_ids"][i][batch["attention_mask"][i].bool()].tolist()
        want = [1 if t == g.marks["image"][1] else 3 if t == g.marks["audio"][1] else 0 for t in row]
        assert types == want, f"row {i}: token_type_ids do not follow the kept tokens"
    assert counts["image"] == (len(batch["pixel_values"]) if "pixel_values" in batch else 0)
    n_clips = len(batch["input_features"]) if "input_features" in batch else 0
    assert counts["audio"] == n_clips == (len(batch["input_features_mask"]) if "input_features_mask" in batch else 0)
    assert batch["labels"].shape == batch["input_ids"].shape


def _clips(batch):
    """Each remaining clip's valid frame count (input_features_mask), in batch order."""
    return batch["input_features_mask"].sum(dim=-1).tolist() if "input_features_mask" in batch else []


def test_gemma3n_image_runs_kept_whole(g3n, patched, tmp_path):
    g = g3n

    def batch_in(n_images=1):
        return [gemma3n_example(words_before=10, n_images=n_images, words_after=150), gemma3n_example(1, words_after=1)]

    patched()
    full = g.collator()(batch_in(2))
    row0 = unpadded(full, 0)
    budget = _premise_cut_inside(row0, _runs(row0, g.marks, g.lengths), "image", which=1)
    import vlpatch

    vlpatch.revert()
    with pytest.raises(Exception) as info:  # upstream cuts the image run (one image: every release takes it)
        one = g.collator()(batch_in(1))
        cut = _premise_cut_inside(unpadded(one, 0), _runs(unpadded(one, 0), g.marks, g.lengths), "image")
        check_gemma3n_rows(g, g.collator(cut)(batch_in(1)), cut)
    assert "image" in str(info.value).lower() or isinstance(info.value, AssertionError), repr(info.value)

    patched(report=str(tmp_path / "r.jsonl"))
    batch = g.collator(budget)(batch_in(2))
    check_gemma3n_rows(g, batch, budget)
    assert batch["pixel_values"].equal(full["pixel_values"]), "every image kept"
    (row,) = _report(tmp_path)
    assert (row["index"], row["action"], row["media"]) == (0, "truncated", {"image": 2}), row
    assert row["media_tokens"] == row["media_tokens_after"] == 2 * (g.lengths["image"] + 2)

    patched(policy="drop_media", report=str(tmp_path / "r.jsonl"))
    many = [gemma3n_example(words_before=3, n_images=7, words_after=3), gemma3n_example(1, words_after=1, seed=7)]
    full = g.collator()(many)
    batch = g.collator(100)(many)
    check_gemma3n_rows(g, batch, 100)
    kept = len(batch["pixel_values"]) - 1
    assert 1 <= kept < 7 and batch["pixel_values"].equal(full["pixel_values"][list(range(kept)) + [7]])
    assert _report(tmp_path)[-1]["media_removed"] == {"image": list(range(kept, 7))}


def test_gemma3n_audio_and_image_runs_kept_whole(g3n_audio, patched, tmp_path):
    g = g3n_audio

    def batch_in():
        return [
            gemma3n_example(words_before=5, n_images=1, n_audio=2, words_after=150),
            gemma3n_example(1, n_audio=1, words_after=1, seed=5),
        ]

    full = g.collator()(batch_in())
    row0 = unpadded(full, 0)
    budget = _premise_cut_inside(row0, _runs(row0, g.marks, g.lengths), "audio", which=1)
    with pytest.raises(Exception) as info:  # upstream refuses its own cut: "cuts into the expanded audio tokens"
        check_gemma3n_rows(g, g.collator(budget)(batch_in()), budget)
    assert "audio" in str(info.value).lower() or isinstance(info.value, AssertionError), repr(info.value)

    patched(report=str(tmp_path / "r.jsonl"))
    batch = g.collator(budget)(batch_in())
    check_gemma3n_rows(g, batch, budget)
    assert _clips(batch) == _clips(full) and batch["input_features"].equal(full["input_features"]), "every clip kept"
    assert batch["pixel_values"].equal(full["pixel_values"])
    assert unpadded(batch, 1) == unpadded(full, 1)
    (row,) = _report(tmp_path)
    assert (row["index"], row["action"], row["media"]) == (0, "truncated", {"image": 1, "audio": 2}), row
    assert row["media_tokens"] == row["media_tokens_after"] == (g.lengths["image"] + 2) + 2 * (g.lengths["audio"] + 2)


def test_gemma3n_audio_that_does_not_fit_leaves_with_its_features(g3n_audio, patched, tmp_path):
    from vlpatch.integrations.unsloth import filter_dataset

    g = g3n_audio

    def big():  # an image (18 tokens) and five clips of 22: 128 media tokens
        return gemma3n_example(words_before=3, n_images=1, n_audio=5, words_after=3)

    def small(n_audio=1):
        return gemma3n_example(1, n_audio=n_audio, words_after=1, seed=5)

    full = g.collator()([big(), small()])
    clips = _clips(full)
    assert len(clips) == 6 and len(set(clips)) == 6, "each clip told apart by its length"

    patched(policy="drop_media", report=str(tmp_path / "r.jsonl"))
    batch = g.collator(100)([big(), small()])
    check_gemma3n_rows(g, batch, 100)
    kept = len(_clips(batch)) - 1  # example 0's first clips, then example 1's
    assert 1 <= kept < 5 and _clips(batch) == clips[:kept] + clips[5:]
    assert batch["input_features"].equal(full["input_features"][list(range(kept)) + [5]])
    assert batch["pixel_values"].equal(full["pixel_values"])
    (row,) = _report(tmp_path)
    assert (row["action"], row["media_removed"]) == ("media_dropped", {"audio": list(range(kept, 5))}), row

    # images trailing audio: the image leaves, the clips stay, though the batch holds as many images as clips
    trap = [gemma3n_example(3, n_images=2, n_audio=3, words_after=3, audio_first=True), gemma3n_example(1, words_after=1, seed=4)]
    full = g.collator()(trap)
    assert len(full["pixel_values"]) == len(full["input_features"]) == 3
    batch = g.collator(100)(trap)
    check_gemma3n_rows(g, batch, 100)
    assert batch["pixel_values"].equal(full["pixel_values"][[0, 2]])
    assert _clips(batch) == _clips(full) and batch["input_features"].equal(full["input_features"])
    assert _report(tmp_path)[-1]["media_removed"] == {"image": [1]}

    patched(policy="drop", report=str(tmp_path / "r.jsonl"))
    full = g.collator()([big(), small()])
    batch = g.collator(100)([big(), small()])
    check_gemma3n_rows(g, batch, 100)
    assert batch["input_ids"].shape[0] == 1 and unpadded(batch, 0) == unpadded(full, 1)
    assert _clips(batch) == clips[5:] and batch["pixel_values"].equal(full["pixel_values"][[1]])
    last = _report(tmp_path)[-1]
    assert (last["index"], last["action"], last["media"]) == (0, "dropped", {"image": 1, "audio": 5}), last
    batch = g.collator(100)([big(), small(n_audio=0)])  # the only clips leave: no audio tensor left behind
    check_gemma3n_rows(g, batch, 100)
    assert "input_features" not in batch and "input_features_mask" not in batch
    assert len(filter_dataset([small(), big(), small()], g.collator(100))) == 2

    patched(policy="error")
    import vlpatch

    with pytest.raises(vlpatch.SampleError, match="batch example 0: media do not fit"):
        g.collator(100)([big(), small()])


def test_gemma3n_prompt_completion_audio_runs_kept_whole(g3n_audio, patched, tmp_path):
    """TRL's prompt/completion form with the clips in the prompt (upstream refuses audio in the
    completion): the cut lands in the second clip's run, which stays whole, clips and all."""
    g = g3n_audio

    def batch_in():
        out = []
        for ex in (gemma3n_example(5, n_images=1, n_audio=2, words_after=150), gemma3n_example(1, n_audio=1, words_after=1, seed=5)):
            prompt, completion = ex.pop("messages")
            out.append({"prompt": [prompt], "completion": [completion], **ex})
        return out

    full = g.collator()(batch_in())
    row0 = unpadded(full, 0)
    budget = _premise_cut_inside(row0, _runs(row0, g.marks, g.lengths), "audio", which=1)
    with pytest.raises(Exception) as info:  # upstream cuts the prompt/completion row at max_seq_length
        check_gemma3n_rows(g, g.collator(budget)(batch_in()), budget)
    print(f"vanilla: {info.value!r}")
    patched(report=str(tmp_path / "r.jsonl"))
    batch = g.collator(budget)(batch_in())
    check_gemma3n_rows(g, batch, budget)
    assert _clips(batch) == _clips(full) and batch["pixel_values"].equal(full["pixel_values"])
    (row,) = _report(tmp_path)
    assert (row["index"], row["action"], row["media"]) == (0, "truncated", {"image": 1, "audio": 2}), row


# Qwen3-VL: a video is one `<t seconds><|vision_start|> <|video_pad|> x h*w/4 <|vision_end|>` group per
# temporal patch; vlpatch keeps or removes a video's groups together (matrix `video_runs: frame_groups`)


@pytest.fixture(scope="module")
def q3(vu, tmp_path_factory):
    _needs(vu, "_extract_images_videos_for_example", "a message's videos")
    from tests.fixtures import unsloth_families as F

    try:
        processor, marks = F.qwen3_vl(str(tmp_path_factory.mktemp("q3")))
        model = F.tiny_qwen3_vl_model(processor)
    except (ImportError, AttributeError, TypeError) as exc:
        pytest.skip(f"this transformers cannot build a Qwen3-VL processor and model: {exc!r}")
    q3 = _NS()
    q3.processor, q3.model, q3.grouped = processor, model, True
    tok = processor.tokenizer
    q3.marks = {kind: tuple(tok.convert_tokens_to_ids(t) for t in m) for kind, m in marks.items()}
    q3.collator = lambda max_len=None: vu.UnslothVisionDataCollator(model, processor, max_seq_length=max_len, resize="max")
    return q3


def test_qwen3_vl_video_frame_groups_kept_together_where_the_cut_lands_in_them(q3, patched, tmp_path):
    def batch_in():  # one video in the batch (2025.10.13 cannot collate two); every video at the same rate
        return [video_example(60, n_frames=16, words_after=120, fps=2.0), video_example(1, n_videos=0, words_after=1)]

    full = q3.collator()(batch_in())
    row0 = unpadded(full, 0)
    groups = [r for r in _runs(row0, q3.marks, wrapped=True) if r[0] == "video"]
    assert len(groups) >= 2, groups
    # a cut in the middle group's run: upstream leaves part of the video, which the model refuses
    budget = (groups[len(groups) // 2][1] + groups[len(groups) // 2][2]) // 2
    lo, hi = groups[0][1], groups[-1][2]  # the video: its groups and the timestamps between them
    if row0[hi] == q3.marks["video"][2]:  # and an outer pair with the first timestamp (transformers 5.17)
        lo, hi = max(p for p in range(lo) if row0[p] == q3.marks["video"][0]), hi + 1
    media = hi - lo + sum(b - a for k, a, b in _runs(row0, q3.marks, wrapped=True) if k == "image")
    assert media <= budget, (media, budget)
    with pytest.raises(Exception) as info:
        check_qwen_rows(q3, q3.collator(budget)(batch_in()), budget)
    assert "video" in str(info.value).lower() or isinstance(info.value, AssertionError), repr(info.value)

    patched(report=str(tmp_path / "r.jsonl"))
    batch = q3.collator(budget)(batch_in())
    check_qwen_rows(q3, batch, budget)
    assert batch["video_grid_thw"].tolist() == full["video_grid_thw"].tolist(), "no video lost"
    kept = unpadded(batch, 0)
    first = kept.index(q3.marks["video"][1]) - 1 - (groups[0][1] - lo)  # where the video's run starts
    assert kept[first : first + hi - lo] == row0[lo:hi], "the video kept as it was, timestamps and all"
    (row,) = _report(tmp_path)
    assert (row["index"], row["action"], row["media"]) == (0, "truncated", {"image": 1, "video": 1}), row
    assert row["media_tokens"] == row["media_tokens_after"] == media, row


def test_qwen3_vl_videos_that_do_not_fit_leave_whole(vu, q3, patched, tmp_path):
    _several_videos(vu)
    budget = 100

    def big():  # five videos of 8 frames: each fits alone, all together do not
        return video_example(3, n_videos=5, n_frames=8, words_after=3, fps=2.0)

    def small():
        return video_example(1, n_videos=1, n_frames=4, words_after=1, fps=2.0)

    full = q3.collator()([big(), small()])
    assert full["video_grid_thw"].shape[0] == 6
    patched(policy="drop_media", report=str(tmp_path / "r.jsonl"))
    batch = q3.collator(budget)([big(), small()])
    check_qwen_rows(q3, batch, budget)
    n = batch["video_grid_thw"].shape[0] - 1  # example 0's first videos, then example 1's
    assert 1 <= n < 5 and batch["video_grid_thw"].tolist() == full["video_grid_thw"][list(range(n)) + [5]].tolist()
    assert batch["pixel_values_videos"].equal(_patches(full, "video", list(range(n)) + [5]))
    (row,) = [r for r in _report(tmp_path) if r["index"] == 0]
    assert (row["action"], row["media_removed"]) == ("media_dropped", {"video": list(range(n, 5))}), row

    patched(policy="drop", report=str(tmp_path / "r.jsonl"))
    batch = q3.collator(budget)([big(), small()])
    check_qwen_rows(q3, batch, budget)
    assert batch["input_ids"].shape[0] == 1 and batch["video_grid_thw"].tolist() == full["video_grid_thw"][[5]].tolist()


def test_filter_dataset_removes_bad_input_up_to_max_bad(uz, patched, tmp_path):
    """Bad input (placeholders and images that differ in number) is removed and reported by
    filter_dataset; above VLPATCH_MAX_BAD of the examples it stops, naming the count and the first."""
    from vlpatch.integrations.unsloth import filter_dataset

    good = [example(1, words_before=1, words_after=1) for _ in range(9)]
    bad = example(1, words_before=1, words_after=1, n_placeholders=2)
    patched(report=str(tmp_path / "r.jsonl"), max_bad=0.2)
    kept = filter_dataset([*good[:4], bad, *good[4:]], uz.collator(1000))
    assert len(kept) == 9
    rows = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [(r["index"], r["action"]) for r in rows] == [(4, "dropped")] and rows[0]["reason"].startswith("bad_input: image placeholders")
    patched(report=str(tmp_path / "r.jsonl"))  # the default 5%: 1 of 10 is too many
    with pytest.raises(vlpatch.VLPatchError, match=r"1 of 10 examples \(10%\) have bad input, more than VLPATCH_MAX_BAD \(5%\)"):
        filter_dataset([*good[:4], bad, *good[4:]], uz.collator(1000))
    patched(report=str(tmp_path / "r.jsonl"), policy="error")
    with pytest.raises(vlpatch.SampleError, match="placeholders"):
        filter_dataset([bad], uz.collator(1000))
