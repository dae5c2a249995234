"""The real `UnslothVisionDataCollator` on Gemma 3n images and audio clips (the audio from the release
that hands it to the processor), vanilla and patched (tests/fixtures/unsloth_families.py): image and
audio runs kept whole, clips that do not fit leaving with their features, the prompt/completion form.

Gemma 3n: images from the `images` column, audio clips from the `audio` column (a datasets.Audio dict
each); one `<start_of_X> <X_soft_token> x n <end_of_X>` run per item, between blank lines (16 image / 20
audio tokens). Upstream hands audio to the processor from a release after 2025.11.6
(`_extract_audio_for_example`: the `audio` column, else the audio parts of the messages; there in
2026.10.9).
"""

from types import SimpleNamespace

import pytest

from tests.fixtures import batch_check
from tests.fixtures.chat_frame import unpadded
from tests.fixtures.tiny_models import image, long_text
from tests.fixtures.unsloth_collators import needs, premise_cut_inside, report

pytestmark = pytest.mark.unsloth


@pytest.fixture(scope="module")
def gemma3n(vision_utils, tiny_qwen2vl_model, tmp_path_factory):
    """The real collator around a tiny Gemma 3n processor (images and audio): its `layout`, the fixed run
    `lengths` per kind, `collator(max_len=None)`."""
    from tests.fixtures import unsloth_families as F

    try:
        processor, _ = F.gemma3n(str(tmp_path_factory.mktemp("g3n")))
    except (ImportError, AttributeError, TypeError) as exc:
        pytest.skip(f"this transformers cannot build a Gemma 3n processor: {exc!r}")
    # the model is only read for its dtype and sizes by the collator
    return SimpleNamespace(
        vision_utils=vision_utils, processor=processor, layout=batch_check.layout("gemma3n", processor.tokenizer),
        lengths={"image": processor.image_seq_length, "audio": processor.audio_seq_length},
        collator=lambda max_len=None: vision_utils.UnslothVisionDataCollator(
            tiny_qwen2vl_model, processor, max_seq_length=max_len, resize="max"
        ),
    )


@pytest.fixture
def gemma3n_audio(gemma3n):
    """`gemma3n`, skipped where the installed collator never hands audio to the processor."""
    needs(gemma3n.vision_utils, "_extract_audio_for_example", "audio")
    return gemma3n


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
    """`batch_check.check`: every image / audio run whole and of its fixed length; one pixel_values entry
    per image run and one input_features / input_features_mask entry per audio run; token_type_ids
    aligned (1 on image soft tokens, 3 on audio soft tokens, as the processor writes them). Returns the
    runs per row."""
    sizes = batch_check.gemma_sizes(batch, g.lengths["image"], g.lengths["audio"])
    return batch_check.check(batch, g.layout, sizes, budget=budget, labels=True, token_types={"image": 1, "audio": 3})


def _clips(batch):
    """Each remaining clip's valid frame count (input_features_mask), in batch order."""
    return batch["input_features_mask"].sum(dim=-1).tolist() if "input_features_mask" in batch else []


def test_gemma3n_image_runs_kept_whole(gemma3n, patched, tmp_path):
    g = gemma3n

    def batch_in(n_images=1):
        return [gemma3n_example(words_before=10, n_images=n_images, words_after=150), gemma3n_example(1, words_after=1)]

    patched()
    full = g.collator()(batch_in(2))
    row0 = unpadded(full, 0)
    budget = premise_cut_inside(row0, check_gemma3n_rows(g, full)[0], "image", which=1)
    import vlpatch

    vlpatch.revert()
    with pytest.raises(Exception) as info:  # upstream cuts the image run (one image: every release takes it)
        one = g.collator()(batch_in(1))
        cut = premise_cut_inside(unpadded(one, 0), check_gemma3n_rows(g, one)[0], "image")
        check_gemma3n_rows(g, g.collator(cut)(batch_in(1)), cut)
    assert "image" in str(info.value).lower() or isinstance(info.value, AssertionError), repr(info.value)

    patched(report=str(tmp_path / "r.jsonl"))
    batch = g.collator(budget)(batch_in(2))
    check_gemma3n_rows(g, batch, budget)
    assert batch["pixel_values"].equal(full["pixel_values"]), "every image kept"
    (row,) = report(tmp_path)
    assert (row["index"], row["action"], row["media"]) == (0, "truncated", {"image": 2}), row
    assert row["media_tokens"] == row["media_tokens_after"] == 2 * (g.lengths["image"] + 2)

    patched(policy="drop_media", report=str(tmp_path / "r.jsonl"))
    many = [gemma3n_example(words_before=3, n_images=7, words_after=3), gemma3n_example(1, words_after=1, seed=7)]
    full = g.collator()(many)
    batch = g.collator(100)(many)
    check_gemma3n_rows(g, batch, 100)
    kept = len(batch["pixel_values"]) - 1
    assert 1 <= kept < 7 and batch["pixel_values"].equal(full["pixel_values"][list(range(kept)) + [7]])
    assert report(tmp_path)[-1]["media_removed"] == {"image": list(range(kept, 7))}


def test_gemma3n_audio_and_image_runs_kept_whole(gemma3n_audio, patched, tmp_path):
    g = gemma3n_audio

    def batch_in():
        return [
            gemma3n_example(words_before=5, n_images=1, n_audio=2, words_after=150),
            gemma3n_example(1, n_audio=1, words_after=1, seed=5),
        ]

    full = g.collator()(batch_in())
    row0 = unpadded(full, 0)
    budget = premise_cut_inside(row0, check_gemma3n_rows(g, full)[0], "audio", which=1)
    with pytest.raises(Exception) as info:  # upstream refuses its own cut: "cuts into the expanded audio tokens"
        check_gemma3n_rows(g, g.collator(budget)(batch_in()), budget)
    assert "audio" in str(info.value).lower() or isinstance(info.value, AssertionError), repr(info.value)

    patched(report=str(tmp_path / "r.jsonl"))
    batch = g.collator(budget)(batch_in())
    check_gemma3n_rows(g, batch, budget)
    assert _clips(batch) == _clips(full) and batch["input_features"].equal(full["input_features"]), "every clip kept"
    assert batch["pixel_values"].equal(full["pixel_values"])
    assert unpadded(batch, 1) == unpadded(full, 1)
    (row,) = report(tmp_path)
    assert (row["index"], row["action"], row["media"]) == (0, "truncated", {"image": 1, "audio": 2}), row
    assert row["media_tokens"] == row["media_tokens_after"] == (g.lengths["image"] + 2) + 2 * (g.lengths["audio"] + 2)


def test_gemma3n_audio_that_does_not_fit_leaves_with_its_features(gemma3n_audio, patched, tmp_path):
    from vlpatch.integrations.unsloth import filter_dataset

    g = gemma3n_audio

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
    (row,) = report(tmp_path)
    assert (row["action"], row["media_removed"]) == ("media_dropped", {"audio": list(range(kept, 5))}), row

    # images trailing audio: the image leaves, the clips stay, though the batch holds as many images as clips
    trap = [gemma3n_example(3, n_images=2, n_audio=3, words_after=3, audio_first=True), gemma3n_example(1, words_after=1, seed=4)]
    full = g.collator()(trap)
    assert len(full["pixel_values"]) == len(full["input_features"]) == 3
    batch = g.collator(100)(trap)
    check_gemma3n_rows(g, batch, 100)
    assert batch["pixel_values"].equal(full["pixel_values"][[0, 2]])
    assert _clips(batch) == _clips(full) and batch["input_features"].equal(full["input_features"])
    assert report(tmp_path)[-1]["media_removed"] == {"image": [1]}

    patched(policy="drop", report=str(tmp_path / "r.jsonl"))
    full = g.collator()([big(), small()])
    batch = g.collator(100)([big(), small()])
    check_gemma3n_rows(g, batch, 100)
    assert batch["input_ids"].shape[0] == 1 and unpadded(batch, 0) == unpadded(full, 1)
    assert _clips(batch) == clips[5:] and batch["pixel_values"].equal(full["pixel_values"][[1]])
    last = report(tmp_path)[-1]
    assert (last["index"], last["action"], last["media"]) == (0, "dropped", {"image": 1, "audio": 5}), last
    batch = g.collator(100)([big(), small(n_audio=0)])  # the only clips leave: no audio tensor left behind
    check_gemma3n_rows(g, batch, 100)
    assert "input_features" not in batch and "input_features_mask" not in batch
    assert len(filter_dataset([small(), big(), small()], g.collator(100))) == 2

    patched(policy="error")
    import vlpatch

    with pytest.raises(vlpatch.SampleError, match="batch example 0: media do not fit"):
        g.collator(100)([big(), small()])


def test_gemma3n_prompt_completion_audio_runs_kept_whole(gemma3n_audio, patched, tmp_path):
    """TRL's prompt/completion form with the clips in the prompt (upstream refuses audio in the
    completion): the cut lands in the second clip's run, which stays whole, clips and all."""
    g = gemma3n_audio

    def batch_in():
        out = []
        for ex in (gemma3n_example(5, n_images=1, n_audio=2, words_after=150), gemma3n_example(1, n_audio=1, words_after=1, seed=5)):
            prompt, completion = ex.pop("messages")
            out.append({"prompt": [prompt], "completion": [completion], **ex})
        return out

    full = g.collator()(batch_in())
    row0 = unpadded(full, 0)
    budget = premise_cut_inside(row0, check_gemma3n_rows(g, full)[0], "audio", which=1)
    with pytest.raises(Exception) as info:  # upstream cuts the prompt/completion row at max_seq_length
        check_gemma3n_rows(g, g.collator(budget)(batch_in()), budget)
    print(f"vanilla: {info.value!r}")
    patched(report=str(tmp_path / "r.jsonl"))
    batch = g.collator(budget)(batch_in())
    check_gemma3n_rows(g, batch, budget)
    assert _clips(batch) == _clips(full) and batch["pixel_values"].equal(full["pixel_values"])
    (row,) = report(tmp_path)
    assert (row["index"], row["action"], row["media"]) == (0, "truncated", {"image": 1, "audio": 2}), row


