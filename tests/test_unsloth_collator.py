"""The real `unsloth_zoo.vision_utils.UnslothVisionDataCollator` of the installed unsloth_zoo, vanilla
and patched, on a tiny offline Qwen2-VL (real processor), then a few real optimizer steps.

Import recipe for CPU machines: tests/fixtures/unsloth_import.py.
"""

import json

import pytest

from tests.conftest import require
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
            _, uz.processor, _, media = getattr(tiny_processors, request.param)(str(tmp_path_factory.mktemp("p")))
        except (ImportError, AttributeError, TypeError) as exc:
            pytest.skip(f"this transformers cannot build a {request.param} processor: {exc!r}")
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
    uz.collator = lambda max_len=None: vu.UnslothVisionDataCollator(model, uz.processor, max_seq_length=max_len, resize="max")
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
    import yaml

    import vlpatch.matrix as vmatrix

    with open(vmatrix.MATRIX_PATH, encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    for raw in data["patches"]:
        if raw["distribution"] == "unsloth_zoo":
            table = raw["options"]["media_tokens"][type(uz.processor).__name__]["image"]
            table.pop("start", None)
            table.pop("end", None)
            table["body"] = "<|endoftext|>" if uz.family != "gemma3" else "<eos>"  # a token that is not the image's
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("VLPATCH_MATRIX", str(path))
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
    collator = uz.collator(100)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    losses = []
    for step in range(3):
        batch = collator([example(2 - step % 2, words_before=80), example(1)])
        check_rows(uz, batch, budget=100)
        out = model(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses


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
