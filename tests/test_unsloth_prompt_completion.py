"""The real `UnslothVisionDataCollator` on TRL's prompt/completion examples (unsloth_zoo 2025.9.3 on),
vanilla and patched: every image of the `images` column taken, truncation keeping image runs whole.
The families and the collator: `unsloth_collator` (tests/conftest.py)."""

import json

import pytest

from tests.fixtures import batch_check
from tests.fixtures.unsloth_collators import check_rows, example, images, unsloth_status

pytestmark = pytest.mark.unsloth


def prompt_completion_example(n_images, words_before=5, words_after=3, n_placeholders=None, side=224):
    """TRL's prompt/completion form: user messages with the image placeholders, an assistant
    completion, and the `images` column."""
    convo = example(n_images, words_before, words_after, n_placeholders, side)
    prompt, completion = convo["messages"]
    return {"prompt": [prompt], "completion": [completion], "images": convo["images"]}


@pytest.fixture
def prompt_completion_collator(unsloth_collator):
    """`unsloth_collator` (an image family's real collator), skipped on the releases without a
    prompt/completion path (before 2025.9.3)."""
    if unsloth_collator.version < unsloth_collator.version.__class__("2025.9.3"):
        pytest.skip(f"unsloth_zoo {unsloth_collator.version} has no prompt/completion path")
    return unsloth_collator


def per_token(collator) -> tuple:
    """The keys a patched prompt/completion batch must hold as wide as input_ids. Before 2025.11.1
    upstream's prompt/completion collation builds token_type_ids from the prompt alone, narrower than
    input_ids in its own batches too (2025.9.5, one image a row, vanilla: token_type_ids (2, 67) beside
    input_ids (2, 101); 2025.10.13 collates no such batch with images at all): vlpatch leaves them as
    upstream made them (docs/unsloth.md)."""
    if collator.version < collator.version.__class__("2025.11.1"):
        return tuple(key for key in batch_check.PER_TOKEN if key != "token_type_ids")
    return batch_check.PER_TOKEN


def test_prompt_completion_every_column_image(prompt_completion_collator, patched):
    st = unsloth_status(patched().status())
    native = "native" in st["parts"]["pc_images"]
    import vlpatch

    vlpatch.revert()
    if not native:
        with pytest.raises(Exception) as info:  # first image only, or the column ignored, or the tuple as the image list
            check_rows(prompt_completion_collator, prompt_completion_collator.collator()([prompt_completion_example(2), prompt_completion_example(1)]),
                       per_token=per_token(prompt_completion_collator))
        print(f"vanilla {prompt_completion_collator.version}: {info.value!r}")
    patched()
    batch = prompt_completion_collator.collator()([prompt_completion_example(2), prompt_completion_example(1)])
    assert images(check_rows(prompt_completion_collator, batch, per_token=per_token(prompt_completion_collator))) == 3


def test_prompt_completion_placeholder_count_differs(prompt_completion_collator, patched):
    import vlpatch

    st = unsloth_status(patched().status())
    if "applied" not in st["parts"]["pc_images"]:
        pytest.skip(f"prompt/completion images are native in unsloth_zoo {prompt_completion_collator.version}")
    with pytest.raises(vlpatch.SampleError, match=r"batch example 1: image placeholders in prompt and completion and images differ \(2 placeholder\(s\), 1 image\(s\)\)"):
        prompt_completion_collator.collator()([prompt_completion_example(1), prompt_completion_example(1, n_placeholders=2)])


def test_prompt_completion_truncation_keeps_runs_whole(prompt_completion_collator, patched, tmp_path):
    with pytest.raises(Exception) as info:
        check_rows(prompt_completion_collator, prompt_completion_collator.collator(100)([prompt_completion_example(1, words_before=150), prompt_completion_example(1)]),
                   budget=100, per_token=per_token(prompt_completion_collator))
    print(f"vanilla {prompt_completion_collator.version}: {info.value!r}")
    patched(report=str(tmp_path / "r.jsonl"))
    full = prompt_completion_collator.collator()([prompt_completion_example(1, words_before=150), prompt_completion_example(1, words_before=1, words_after=1)])
    batch = prompt_completion_collator.collator(100)([prompt_completion_example(1, words_before=150), prompt_completion_example(1, words_before=1, words_after=1)])
    check_rows(prompt_completion_collator, batch, budget=100, per_token=per_token(prompt_completion_collator))
    row_of = lambda b, i: b["input_ids"][i][b["attention_mask"][i].bool()].tolist()  # noqa: E731
    assert row_of(batch, 1) == row_of(full, 1), "the example that fits is untouched"
    tok = prompt_completion_collator.processor.tokenizer
    kept, whole = row_of(batch, 0), row_of(full, 0)
    # upstream cuts prompt/completion rows on the padding side: left padding keeps the completion's end
    it = iter(whole)
    assert all(t in it for t in kept), "kept tokens are a subsequence of the uncut row"
    assert (kept[-1] == whole[-1]) if tok.padding_side == "left" else (kept[0] == whole[0])
    (row,) = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert row["action"] == "truncated" and row["index"] == 0 and row["tokens_after"] <= 100


