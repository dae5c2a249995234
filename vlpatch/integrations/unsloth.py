"""Unsloth: `unsloth_zoo.vision_utils.UnslothVisionDataCollator`, every image and whole media runs.

Which symbols and versions: `compat_matrix.yaml` (patch `unsloth.collator`, parts `multi_image` and
`truncation`). How it hands over:

* `multi_image`: `_extract_images_videos_for_example` runs as upstream wrote it; where upstream kept
  only `example["images"][0]`, the wrapper returns every image of the `images` column instead, after
  checking that the rendered conversation has one image placeholder per image (else a `SampleError`
  naming the example's index in the batch and both counts).
* `truncation`: `__call__` runs upstream's collator with `max_seq_length` unset, so the processor
  expands every image and cuts nothing; then each row longer than `max_seq_length` is cut by
  `core.fit_sequence` on the tokenizer's truncation side with whole media runs, and the batch tensors
  are rebuilt: per-token tensors (input_ids, attention_mask, labels, token_type_ids,
  mm_token_type_ids, cross-attention masks) at the kept positions, re-padded on the tokenizer's
  padding side; dropped examples and removed media items leave their tensors too: images
  pixel_values / image_grid_thw (or their per-image companions), videos pixel_values_videos /
  video_grid_thw / second_per_grid_ts, audio clips the processor's per-clip tensors (Gemma 3n's
  input_features / input_features_mask). A kind whose tensors vlpatch cannot take apart makes a sample
  that would lose it a `SampleError` naming it, never a blind cut.

Media token layouts per processor class are data in the matrix (its `processors:` section, gathered into
the patch's `options.media_tokens`; how the pixel tensors hold images: `options.pixel_layout`; which
tensors hold one entry per audio clip: `options.audio_tensors`).
"""

from __future__ import annotations

import sys
from collections import Counter

from .. import core
from ..errors import unreadable_media
from . import _collator
from ._collator import DEFAULT_REPORT  # noqa: F401  (re-exported)

TRAINER = "unsloth"

_active: set = set()
_batches: list = []  # stack of the example lists being collated


EmptyBatchError = _collator.EmptyBatchError  # every example of a batch was dropped

# the media-run arithmetic and tensor rebuild shared with the TRL integration (vlpatch/integrations/_collator.py)
SITE = _collator.CollatorPatch(TRAINER, "max_seq_length", "vlpatch.integrations.unsloth.filter_dataset(dataset, collator)")


# --------------------------------------------------------------------------- multi_image


def _count_placeholders(messages) -> Counter:
    counts: Counter = Counter()
    for message in messages or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, (list, tuple)):
            for part in content:
                if isinstance(part, dict) and part.get("type") in ("image", "video"):
                    counts[part["type"]] += 1
    return counts


def _batch_index(example) -> str:
    for examples in reversed(_batches):
        for i, ex in enumerate(examples):
            if ex is example:
                return f"batch example {i}"
    return "batch example ?"


def _checked(example, column, messages, where: str = "") -> list:
    """The column as a list, after checking it against the image placeholders of `messages`."""
    column = list(column) if isinstance(column, (list, tuple)) else [column]
    want = _count_placeholders(messages)["image"]
    if want != len(column):
        raise core.SampleError(
            _batch_index(example), f"image placeholders{where} and images differ", f"{want} placeholder(s), {len(column)} image(s)"
        )
    return column


def _column_images(args, kwargs):
    """Every image of the example's `images` column (one per placeholder), or None: upstream's path."""
    example = args[0] if args else kwargs["example"]
    messages = args[1] if len(args) > 1 else kwargs.get("messages")
    if "multi_image" not in _active or not isinstance(example, dict) or example.get("images") is None:
        return None
    return _checked(example, example["images"], messages)


def _all_images(wrapped, instance, args, kwargs):
    """`_extract_images_videos_for_example` (2025.9.14 on): (images, videos, video kwargs)."""
    column = _column_images(args, kwargs)
    return wrapped(*args, **kwargs) if column is None else (column, [], None)


def _all_images_only(wrapped, instance, args, kwargs):
    """`_extract_images_for_example` (2025.9.3 - 2025.9.13): the image list alone."""
    column = _column_images(args, kwargs)
    return wrapped(*args, **kwargs) if column is None else column


# prompt/completion examples ({"prompt": ..., "completion": ..., "images": [...]}) go through
# `_extract_images_for_pc(example, p_msgs, c_msgs)` instead: upstream took the first column image
# (2025.9.3 - 2025.9.13), then ignored the column whenever the example has messages (to 2026.9.7).


def _pc_args(args, kwargs) -> tuple:
    """(example, p_msgs, c_msgs) of an `_extract_images_for_pc` call."""
    example = args[0] if args else kwargs["example"]
    p_msgs = args[1] if len(args) > 1 else kwargs.get("p_msgs")
    c_msgs = args[2] if len(args) > 2 else kwargs.get("c_msgs")
    return example, p_msgs, c_msgs


def _pc_column(args, kwargs):
    """Every column image of a prompt/completion example, checked against the image placeholders of
    its prompt and completion messages (plain-string prompts carry the model's own image tokens: the
    processor checks those); None: no column, upstream's path."""
    example, p_msgs, c_msgs = _pc_args(args, kwargs)
    if "pc_images" not in _active or not isinstance(example, dict) or not example.get("images"):
        return None
    if p_msgs is None and c_msgs is None:
        column = example["images"]
        return list(column) if isinstance(column, (list, tuple)) else [column]
    return _checked(example, example["images"], list(p_msgs or []) + list(c_msgs or []), " in prompt and completion")


def _pc_images(wrapped, instance, args, kwargs):
    """2025.11.1 on: (images, videos, video kwargs), as upstream returns them."""
    column = _pc_column(args, kwargs)
    return wrapped(*args, **kwargs) if column is None else (column, [], None)


def _pc_images_only(wrapped, instance, args, kwargs):
    """2025.9.3 - 2025.9.13: the image list alone."""
    column = _pc_column(args, kwargs)
    return wrapped(*args, **kwargs) if column is None else column


def _pc_images_unpacked(wrapped, instance, args, kwargs):
    """2025.9.14 - 2025.10.13: upstream returns (images, videos, video kwargs) but its caller takes the
    whole tuple for the image list, so no prompt/completion batch with images collates there (and plain
    string prompts without a column end in UnboundLocalError). Hand the caller the list it expects:
    the column's images, else the images embedded in the messages."""
    column = _pc_column(args, kwargs)
    if column is not None:
        return column
    if "pc_images" in _active:
        _, p_msgs, c_msgs = _pc_args(args, kwargs)
        if not p_msgs and not c_msgs:
            return []
        out = wrapped(*args, **kwargs)
        return list(out[0] or []) if isinstance(out, tuple) else out
    return wrapped(*args, **kwargs)


def _embed_column_images(example, index: int):
    """Releases that inline `example["images"][0]` in `__call__`: hand every column image to upstream's
    own message path instead, one per `{"type": "image"}` item, in order (upstream reads images
    embedded in the messages with `process_vision_info`). The image keeps its own size."""
    if not isinstance(example, dict) or example.get("images") is None:
        return example
    key = "messages" if "messages" in example else "conversations" if "conversations" in example else None
    if key is None:
        return example
    column = example["images"]
    column = list(column) if isinstance(column, (list, tuple)) else [column]
    want = _count_placeholders(example[key])["image"]
    if want != len(column):
        raise core.SampleError(
            f"batch example {index}", "image placeholders and images differ", f"{want} placeholder(s), {len(column)} image(s)"
        )
    images = iter(column)
    messages = []
    for message in example[key]:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, (list, tuple)):
            parts = []
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image" and "image" not in part:
                    img = next(images)
                    part = {**part, "image": img}
                    if hasattr(img, "size"):  # no resize by upstream's fetch_image: the processor resizes
                        part["resized_width"], part["resized_height"] = img.size
                parts.append(part)
            message = {**message, "content": parts}
        messages.append(message)
    out = {k: v for k, v in example.items() if k != "images"}
    out[key] = messages
    return out


def _collate_inline(wrapped, instance, args, kwargs):
    examples = args[0] if args else kwargs["examples"]
    if "multi_image" in _active:
        formatting = getattr(instance, "formatting_func", None)
        if formatting is not None:
            examples = [formatting(example) for example in examples]
        examples = [_embed_column_images(example, i) for i, example in enumerate(examples)]
        if formatting is not None:
            instance.formatting_func = None
            try:
                return _collate(wrapped, instance, (examples,), {})
            finally:
                instance.formatting_func = formatting
    return _collate(wrapped, instance, (examples,), {})


# --------------------------------------------------------------------------- truncation


def _collate(wrapped, instance, args, kwargs):
    examples = args[0] if args else kwargs["examples"]
    budget = getattr(instance, "max_seq_length", None)
    _batches.append(examples)
    try:
        if getattr(instance, "formatting_func", None) is None:  # bad input named here, in every era
            for example in examples if isinstance(examples, (list, tuple)) else ():
                if isinstance(example, dict) and example.get("images") is not None:
                    key = "messages" if "messages" in example else "conversations" if "conversations" in example else None
                    if key is not None:
                        _checked(example, example["images"], example[key])
        if "truncation" not in _active or not budget or not SITE.covers(instance.processor, "Unsloth"):
            # an uncovered processor is left to upstream entirely (listed by status(); warned once)
            return wrapped(*args, **kwargs)
        copies = _collator.copies_for_shrink(examples)  # policy shrink collates some examples again

        def uncut(batch_examples=None):
            saved = instance.max_seq_length, instance.truncation
            instance.max_seq_length, instance.truncation = None, False
            try:
                return wrapped(*args, **kwargs) if batch_examples is None else wrapped(_collator.copies_for_shrink(batch_examples, always=True))
            finally:
                instance.max_seq_length, instance.truncation = saved

        batch = uncut()
        # prompt/completion batches (upstream's own test, after formatting_func): upstream cuts them on
        # the padding side (left padding keeps the tail), the messages path on the truncation side
        formatting = getattr(instance, "formatting_func", None)
        first = formatting(examples[0]) if formatting is not None and examples else (examples[0] if examples else {})
        side = "padding_side" if isinstance(first, dict) and "prompt" in first and "completion" in first else "truncation_side"
        # media of a later turn leave with the part the cut removes (where the messages tell the turns)
        firsts = [_collator.first_turn_items(e) for e in examples] if formatting is None else None
        frames = _collator.chat_frames(examples) if formatting is None else None
        return _fit(instance, batch, budget, side, copies, uncut, firsts, frames)
    finally:
        _batches.pop()


def _fit(collator, batch, budget: int, side: str = "truncation_side", examples=None, recollate=None, firsts=None, frames=None):
    tokenizer = getattr(collator.processor, "tokenizer", collator.processor)
    keep = "tail" if getattr(tokenizer, side, "right") == "left" else "head"
    return SITE.fit(collator, batch, budget, keep=keep, examples=examples, recollate=recollate, firsts=firsts, frames=frames)


# --------------------------------------------------------------------------- pre-filter


def filter_dataset(dataset, collator):
    """Keep the examples the patched collator would not drop (same arithmetic, one example at a time).

    Run it before training so that no batch ends up empty. Works on a `datasets.Dataset` (returns a
    filtered Dataset) or a list (returns a list). Each removed example gets a report row naming its
    dataset index (`"stage": "filter_dataset"`); examples that fit after a cut are kept and reported
    when training cuts them. Bad input (image placeholders and images that differ in number, an
    unreadable image) is removed and reported too (`bad_input`), unless the policy is `error` (raises)
    or it exceeds VLPATCH_MAX_BAD of the examples: then it raises, naming the count and the first ones.
    """
    return SITE.filter_dataset(dataset, collator, _is_bad_input)


def _is_bad_input(exc: BaseException) -> bool:
    if isinstance(exc, core.SampleError):
        return "placeholders" in exc.reason
    return unreadable_media(exc)


def details(spec) -> dict:
    table = spec.options.get("media_tokens", {})
    return {"covered_processors": sorted(table)}


WRAPPERS = {
    "collate": _collate,
    "collate_inline": _collate_inline,
    "all_images": _all_images,
    "all_images_only": _all_images_only,
    "pc_images": _pc_images,
    "pc_images_only": _pc_images_only,
    "pc_images_unpacked": _pc_images_unpacked,
}


def _frame_factor() -> int:
    """The multiple upstream's video reader rounds `nframes` to (`FRAME_FACTOR`; 1 where it has none)."""
    module = sys.modules.get("unsloth_zoo.vision_utils")
    return int(getattr(module, "FRAME_FACTOR", 1) or 1)


def _read_video(part):
    """A video message part as the collator reads it (upstream's `fetch_video`): (T, C, H, W) frames."""
    from unsloth_zoo import vision_utils

    video = vision_utils.fetch_video(part)
    return video[0] if isinstance(video, tuple) else video


def wrappers(spec, version=None) -> dict:
    global _active
    SITE.attach(spec)
    SITE.read_video = _read_video
    SITE.frame_factor = _frame_factor()
    _active = spec.active_parts(version) if version is not None else {p.name for p in spec.parts}
    return WRAPPERS
