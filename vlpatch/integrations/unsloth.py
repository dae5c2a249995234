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

Media token layouts per processor class are data in the matrix (`options.media_tokens`, how the pixel
tensors hold images: `options.pixel_layout`, which tensors hold one entry per audio clip:
`options.audio_tensors`).
"""

from __future__ import annotations

import logging
from collections import Counter

from .. import core, engine, report

TRAINER = "unsloth"
DEFAULT_REPORT = "vlpatch_report.jsonl"  # in the working directory: a collator does not know output_dir
logger = logging.getLogger("vlpatch")

_spec = None
_active: set = set()
_batches: list = []  # stack of the example lists being collated
_finders: dict = {}
_warned: set = set()
_filtering: list = []  # filter_dataset: [dataset index, rows of that one-example batch]


class EmptyBatchError(core.VLPatchError):
    """Every example of a batch was dropped: filter the dataset before training."""


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


def _finder(processor) -> core.RunFinder | None:
    key = id(processor)
    hit = _finders.get(key)
    if hit is None:
        hit = (processor, _build_finder(processor))
        _finders[key] = hit
    return hit[1]


def _pixel_layout(processor) -> str:
    """How a processor's pixel tensors hold images (matrix `options.pixel_layout`): grid / per_image / per_row."""
    return (_spec.options if _spec else {}).get("pixel_layout", {}).get(type(processor).__name__, "grid")


def _audio_tensors(processor) -> list:
    """The batch keys holding one entry per audio clip (matrix `options.audio_tensors`; Gemma 3n:
    input_features, input_features_mask), the first one counting the clips; [] where none is known."""
    return list((_spec.options if _spec else {}).get("audio_tensors", {}).get(type(processor).__name__, []))


# media tensors that are never per-token, whatever their shape: input_features_mask [clips, frames] can
# match [batch, sequence] by chance (upstream's _truncate_sequence_tensors has the same warning)
_VIDEO_KEYS = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
_MEDIA_KEYS = frozenset(
    ("pixel_values", "image_grid_thw", "image_sizes", "aspect_ratio_ids", "aspect_ratio_mask", *_VIDEO_KEYS)
)


def _frame_groups(batch, processor):
    """For a processor whose videos are one run per frame group (matrix `options.video_runs`:
    `frame_groups`, Qwen3-VL: `<t seconds><|vision_start|> <|video_pad|> x h*w/merge^2 <|vision_end|>` for
    each of the video's t temporal patches): (groups, body tokens per group) per video of the batch, in
    order, from video_grid_thw. None for every other processor."""
    kind = (_spec.options if _spec else {}).get("video_runs", {}).get(type(processor).__name__)
    if kind != "frame_groups":
        return None
    grid = batch.get("video_grid_thw")
    if grid is None:
        return []
    merge = getattr(getattr(processor, "video_processor", None), "merge_size", None) or 2
    return [(int(t), int(h) * int(w) // (merge * merge)) for t, h, w in grid.tolist()]


def _merge_frame_groups(row, runs: list, groups: list, video: int, finder, processor) -> tuple:
    """A row's runs with each video's frame-group runs merged into one run (the timestamps between them
    inside it), so that a video is kept or removed whole. Where the processor leaves the template's own
    `<|vision_start|>` ... `<|vision_end|>` around the groups (transformers 5.17 expands the video token
    alone), the run takes that pair and the first timestamp too. `video`: the batch-wide index of the row's
    first video; returns (runs, index of the next row's first video). A row whose frame groups do not
    match video_grid_thw is refused (VLPatchError): never cut blindly."""
    spec = finder.kinds["video"]
    out, k = [], 0
    while k < len(runs):
        run = runs[k]
        if run.kind != "video":
            out.append(run)
            k += 1
            continue
        members = runs[k : k + groups[video][0]] if video < len(groups) else []
        if (
            not members
            or len(members) != groups[video][0]
            or any(r.kind != "video" or r.length != groups[video][1] + 2 for r in members)
        ):
            import importlib.metadata

            raise core.VLPatchError(
                f"vlpatch: {type(processor).__name__} (transformers {importlib.metadata.version('transformers')}) "
                f"writes video #{video} in a way the compat matrix does not describe (its frame-group runs do not "
                "match video_grid_thw). vlpatch will not cut it blindly; exclude the patch (VLPATCH_EXCLUDE) or "
                "upgrade vlpatch, and please report it"
            )
        start, stop = members[0].start, members[-1].stop
        if stop < len(row) and row[stop] == spec.end and spec.start is not None:
            # an outer pair: the nearest start token before the first group, text (the timestamp) between
            floor = out[-1].stop if out else 0
            opener = next((p for p in range(start - 1, floor - 1, -1) if row[p] == spec.start), None)
            if opener is not None:
                start, stop = opener, stop + 1
        out.append(core.Run("video", start, stop))
        video += 1
        k += len(members)
    return out, video


def _removable(kind: str, layout: str, processor) -> bool:
    """Whether items of `kind` can be taken out of this processor's batch tensors."""
    if kind == "image":
        return True
    if kind == "video":
        return layout == "grid"  # Qwen-VL: flat patches in pixel_values_videos, one video_grid_thw row each
    if kind == "audio":
        return bool(_audio_tensors(processor))
    return False


def _build_finder(processor) -> core.RunFinder | None:
    table = (_spec.options if _spec else {}).get("media_tokens", {}).get(type(processor).__name__)
    tokenizer = getattr(processor, "tokenizer", processor)
    return None if table is None else core.finder_from_table(table, tokenizer, processor, tokenizer)


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
        if "truncation" not in _active or not budget or _finder(instance.processor) is None:
            # an uncovered processor is left to upstream entirely (listed by status(); warned once)
            if "truncation" in _active and budget and type(instance.processor).__name__ not in _warned:
                _warned.add(type(instance.processor).__name__)
                logger.warning("vlpatch: %s is not covered: Unsloth truncates it as upstream does", type(instance.processor).__name__)
            return wrapped(*args, **kwargs)
        saved = instance.max_seq_length, instance.truncation
        instance.max_seq_length, instance.truncation = None, False
        try:
            batch = wrapped(*args, **kwargs)
        finally:
            instance.max_seq_length, instance.truncation = saved
        # prompt/completion batches (upstream's own test, after formatting_func): upstream cuts them on
        # the padding side (left padding keeps the tail), the messages path on the truncation side
        formatting = getattr(instance, "formatting_func", None)
        first = formatting(examples[0]) if formatting is not None and examples else (examples[0] if examples else {})
        side = "padding_side" if isinstance(first, dict) and "prompt" in first and "completion" in first else "truncation_side"
        return _fit(instance, batch, budget, side)
    finally:
        _batches.pop()


def _fit(collator, batch, budget: int, side: str = "truncation_side"):
    import torch

    ids, mask = batch["input_ids"], batch.get("attention_mask")
    if ids.dim() != 2 or ids.shape[1] <= budget:
        if not _filtering:
            report.tally(Counter({"kept": ids.shape[0]}), Counter())
        return batch
    processor = collator.processor
    tokenizer = getattr(processor, "tokenizer", processor)
    finder = _finder(processor)
    cfg = engine.config()
    policy = core.get_policy(cfg.policy)
    keep = "tail" if getattr(tokenizer, side, "right") == "left" else "head"
    layout = _pixel_layout(processor)
    B, L = ids.shape
    groups = _frame_groups(batch, processor)  # Qwen3-VL: a video is one run per frame group
    video = 0  # batch-wide index of the next video
    parsed = []  # per row: its unpadded positions, token ids, media runs and items per kind
    for i in range(B):
        pos = (mask[i] != 0).nonzero().flatten().tolist() if mask is not None else list(range(L))
        row = ids[i, pos].tolist()
        runs = finder.find(row)
        if groups is not None:
            runs, video = _merge_frame_groups(row, runs, groups, video, finder, processor)
        parsed.append((pos, row, runs, finder.count_items(row, runs)))
    _check_table(parsed, batch, layout, processor)
    rows_kept, rows, counts, reasons = [], [], Counter(), Counter()
    removed: dict = {}  # kind -> batch-wide indices of the items that leave
    base: Counter = Counter()  # kind -> batch-wide index of this row's first item
    for i, (pos, row, runs, items) in enumerate(parsed):
        sample = f"dataset[{_filtering[0]}]" if _filtering else f"batch example {i}"
        if len(row) <= budget:
            rows_kept.append((i, pos))
            counts["kept"] += 1
            base.update(items)
            continue
        runs = finder.assign_items(row, runs, items)
        media = sum(r.length for r in runs)
        err = {"trainer": TRAINER, "index": i, "action": "error", "budget": budget}
        if _filtering:
            err = {**err, "index": _filtering[0], "stage": "filter_dataset"}
        try:
            decision = core.fit_sequence(len(row), runs, budget, policy, sample, keep=keep)
            if decision.removed and layout == "per_row":  # one image cannot leave a row's pixel slots
                why = f"{decision.reason}; {type(processor).__name__} keeps images per row: example dropped"
                decision = core.Decision("dropped", None, reason=why)
        except core.SampleError:
            report.write_rows([{**err, "reason": "media_exceed_budget"}], DEFAULT_REPORT)
            raise
        entry = {
            "trainer": TRAINER, "index": i, "budget": budget, "tokens_before": len(row),
            "media": {"image": items["image"], **{k: n for k, n in sorted(items.items()) if n and k != "image"}},
        }
        # the kinds this decision takes out: every item of the row when it is dropped, else those removed
        leaving = {kind for kind, n in items.items() if n} if decision.action == "dropped" else {k for k, _ in decision.removed}
        if decision.action == "dropped" and layout == "per_row":
            leaving = set()  # per-row tensors leave with their row
        stuck = sorted(kind for kind in leaving if not _removable(kind, layout, processor))
        if stuck:  # kept whole when text is cut, but this processor's tensors for them cannot be taken apart
            what = ", ".join(f"{kind}s" for kind in stuck)
            why = f"{type(processor).__name__} {what} cannot be taken out of its batch tensors ({decision.reason})"
            report.write_rows([{**err, "reason": "media_not_removable: " + why}], DEFAULT_REPORT)
            raise core.SampleError(sample, f"a sample with {what} does not fit max_seq_length", why + "; filter the dataset first")
        if decision.action == "dropped":
            for kind in leaving:
                removed.setdefault(kind, []).extend(range(base[kind], base[kind] + items[kind]))
            rows.append({**entry, "action": "dropped", "reason": decision.reason})
        else:
            kept = decision.kept[0]
            gone: dict = {}
            for kind, k in sorted(decision.removed):
                gone.setdefault(kind, []).append(k)
                removed.setdefault(kind, []).append(base[kind] + k)
            rows_kept.append((i, [pos[p] for p in kept]))
            kept_media = sum(r.length for r in runs if not set(r.keys()) & set(decision.removed))
            rows.append(
                {
                    **entry,
                    "action": decision.action,
                    "reason": decision.reason or "text_over_budget",
                    "tokens_after": len(kept),
                    "media_tokens": media,
                    "media_tokens_after": kept_media,
                    "media_removed": gone,
                }
            )
        counts[decision.action] += 1
        reasons[(decision.reason or "text_over_budget").split(":")[0]] += 1
        base.update(items)
    if _filtering:  # filter_dataset reports what it removes; training reports its own cuts
        _filtering[1].extend(rows)
    else:
        report.write_rows(rows, DEFAULT_REPORT)
        report.tally(counts, reasons)
    if not rows_kept:
        names = ", ".join(f"example {r['index']}" for r in rows)
        raise EmptyBatchError(
            f"vlpatch: every example of this batch was dropped ({names}: media do not fit "
            f"max_seq_length={budget}); filter the dataset first with "
            "vlpatch.integrations.unsloth.filter_dataset(dataset, collator)"
        )
    return _rebuild(collator, batch, rows_kept, removed, base, layout, torch)


def _expected_items(batch, layout: str, processor=None) -> dict:
    """Items per kind the processor produced for this batch, as its tensors tell (None: cannot tell)."""
    out = {}
    if layout == "grid":
        for kind, key in (("image", "image_grid_thw"), ("video", "video_grid_thw")):
            value = batch.get(key)
            out[kind] = 0 if value is None else int(value.shape[0])
    elif layout == "per_image":
        value = batch.get("pixel_values")
        out["image"] = 0 if value is None else len(value)
    elif layout == "per_row" and batch.get("aspect_ratio_ids") is not None:
        out["image"] = int((batch["aspect_ratio_ids"] != 0).sum())
    audio = _audio_tensors(processor)
    if audio:
        value = batch.get(audio[0])
        out["audio"] = 0 if value is None else len(value)
    return out


def _check_table(parsed, batch, layout, processor) -> None:
    """Before cutting anything: the media runs the matrix's token table finds in input_ids must be the
    media the processor produced. A processor release that writes its media otherwise (transformers
    5.17 renamed Gemma3Processor.image_token) would otherwise be cut blindly: refuse, loudly."""
    found: Counter = Counter()
    for _, _, _, items in parsed:
        found.update(items)
    for kind, expected in _expected_items(batch, layout, processor).items():
        if found.get(kind, 0) != expected:
            import importlib.metadata

            version = importlib.metadata.version("transformers")
            raise core.VLPatchError(
                f"vlpatch: {type(processor).__name__} (transformers {version}) writes its {kind}s in a way the "
                f"compat matrix does not describe: {found.get(kind, 0)} {kind} run(s) in this batch's input_ids, "
                f"{expected} {kind}(s) in its {'audio' if kind == 'audio' else 'pixel'} tensors. vlpatch will not "
                "cut it blindly; exclude the patch (VLPATCH_EXCLUDE) or upgrade vlpatch, and please report it"
            )


def _rebuild(collator, batch, rows_kept, removed: dict, totals: Counter, layout, torch):
    """The batch at the kept positions of the kept rows, without the removed media items.

    `removed`: kind -> batch-wide indices of the items that leave; `totals`: items per kind in the batch."""
    processor = collator.processor
    tokenizer = getattr(processor, "tokenizer", processor)
    B, L = batch["input_ids"].shape
    new_len = max(len(p) for _, p in rows_kept)
    multiple = getattr(collator, "pad_to_multiple_of", None)
    if multiple and multiple > 1:  # as upstream pads
        new_len = -(-new_len // multiple) * multiple
    left = getattr(tokenizer, "padding_side", "right") == "left"
    pad_values = {"input_ids": tokenizer.pad_token_id or 0, "labels": getattr(collator, "ignore_index", -100)}
    audio_keys = _audio_tensors(processor)
    media_keys = _MEDIA_KEYS | set(audio_keys)
    per_token = set()
    for key, value in list(batch.items()):
        if key in media_keys:
            continue
        if torch.is_tensor(value) and value.dim() >= 2 and value.shape[0] == B and value.shape[1] == L:
            out = value.new_full((len(rows_kept), new_len, *value.shape[2:]), pad_values.get(key, 0))
            for j, (i, pos) in enumerate(rows_kept):
                index = torch.tensor(pos, dtype=torch.long, device=value.device)
                start = new_len - len(pos) if left else 0
                out[j, start : start + len(pos)] = value[i].index_select(0, index)
            batch[key] = out
            per_token.add(key)
    if layout == "per_row" and len(rows_kept) != B:  # pixel_values, aspect ratios ...: one entry per row
        keep_rows = [i for i, _ in rows_kept]
        for key, value in list(batch.items()):
            if key not in per_token and torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == B:
                batch[key] = value[keep_rows]
    elif removed.get("image"):
        skip = per_token | set(audio_keys) | set(_VIDEO_KEYS)
        _drop_images(batch, sorted(set(removed["image"])), totals["image"], layout, skip, torch)
    if removed.get("video"):
        _drop_grid(batch, sorted(set(removed["video"])), "pixel_values_videos", "video_grid_thw", ("second_per_grid_ts",))
    if removed.get("audio"):
        _drop_entries(batch, sorted(set(removed["audio"])), totals["audio"], audio_keys, processor)
    return batch


def _drop_grid(batch, removed: list, pixel_key: str, grid_key: str, companions: tuple = ()):
    """Qwen-VL: flat patches in `pixel_key`, one `grid_key` row (t, h, w) per item, and companions with
    one entry per item (Qwen2.5-VL's second_per_grid_ts). Nothing left of the kind: its keys leave too."""
    gone = set(removed)
    grid = batch[grid_key]
    per_item = grid.prod(dim=-1).tolist()
    if batch[pixel_key].shape[0] != sum(per_item):
        raise core.VLPatchError(
            f"vlpatch: {pixel_key} holds {batch[pixel_key].shape[0]} patches, {grid_key} says {sum(per_item)}: "
            "cannot take items out"
        )
    keep = [k for k in range(len(per_item)) if k not in gone]
    if not keep:
        for key in (pixel_key, grid_key, *companions):
            batch.pop(key, None)
        return
    starts = [0]
    for n in per_item:
        starts.append(starts[-1] + n)
    batch[pixel_key] = batch[pixel_key][[r for k in keep for r in range(starts[k], starts[k + 1])]]
    batch[grid_key] = grid[keep]
    for key in companions:
        value = batch.get(key)
        if value is not None and len(value) == len(per_item):
            batch[key] = value[keep] if hasattr(value, "index_select") else type(value)(value[k] for k in keep)


def _drop_images(batch, removed: list, n_images: int, layout: str, skip: set, torch):
    """Take removed images out of the pixel tensors: Qwen-VL's flat patches with one image_grid_thw row
    per image (`grid`), or one entry per image in pixel_values and its companions (`per_image`: Gemma 3,
    Pixtral's image_sizes; never the per-token, video or audio tensors in `skip`)."""
    gone = set(removed)
    pixels = batch["pixel_values"]
    if layout == "grid":
        _drop_grid(batch, removed, "pixel_values", "image_grid_thw")
    elif layout == "per_image" and pixels.shape[0] == n_images:
        keep = [k for k in range(n_images) if k not in gone]
        for key, value in list(batch.items()):  # pixel_values and its companions (Pixtral's image_sizes)
            if key not in skip and torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == n_images:
                if keep:
                    batch[key] = value[keep]
                else:  # no image left in the batch: no empty pixel tensor for the vision tower
                    del batch[key]
    else:
        raise core.VLPatchError(f"vlpatch: cannot take images out of pixel_values laid out {layout!r}")


def _drop_entries(batch, removed: list, n_items: int, keys: list, processor):
    """Take removed audio clips out of the tensors that hold one entry per clip (Gemma 3n's
    input_features and input_features_mask, padded to the longest clip: the padding stays, masked)."""
    gone = set(removed)
    present = [key for key in keys if batch.get(key) is not None]
    for key in present:
        if len(batch[key]) != n_items:
            raise core.VLPatchError(
                f"vlpatch: {type(processor).__name__}'s {key} holds {len(batch[key])} entries for {n_items} audio "
                "clip(s): cannot take clips out"
            )
    keep = [k for k in range(n_items) if k not in gone]
    for key in present:
        if keep:
            batch[key] = batch[key][keep]
        else:  # no clip left in the batch: the audio tower gets nothing, as for a text-only batch
            del batch[key]


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
    removed: list = []
    seen = [0]
    cfg = engine.config()

    def fits(example, index) -> bool:
        _filtering[:] = [index, []]
        seen[0] += 1
        try:
            collator([example])
            return True
        except EmptyBatchError:
            removed.extend({**row, "index": index, "stage": "filter_dataset"} for row in _filtering[1])
            return False
        except Exception as exc:  # bad input: a placeholder count that differs, an unreadable image
            if not _is_bad_input(exc) or cfg.policy == "error":
                raise
            why = exc.reason + (f" ({exc.detail})" if exc.detail else "") if isinstance(exc, core.SampleError) else f"{type(exc).__name__}: {exc}"
            removed.append({"trainer": TRAINER, "index": index, "stage": "filter_dataset", "action": "dropped",
                            "reason": f"bad_input: {why}"[:500]})
            return False
        finally:
            _filtering.clear()

    if hasattr(dataset, "filter"):
        out = dataset.filter(fits, with_indices=True)
    else:
        out = [ex for i, ex in enumerate(dataset) if fits(ex, i)]
    report.write_rows(removed, DEFAULT_REPORT)
    reasons = Counter(r["reason"].split(":")[0] for r in removed)
    report.tally(Counter({"dropped": len(removed)}), reasons)
    bad = reasons.get("bad_input", 0)
    if seen[0] and bad > cfg.max_bad * seen[0]:  # a wrong path loses much of a dataset: stop, do not filter it away
        first = "; ".join(f"example {r['index']}: {r['reason'][:160]}" for r in removed if r["reason"].startswith("bad_input"))
        raise core.VLPatchError(
            f"vlpatch: {bad} of {seen[0]} examples ({bad / seen[0]:.0%}) have bad input, more than VLPATCH_MAX_BAD "
            f"({cfg.max_bad:.0%}). First: {first[:600]}. Fix the data, or raise VLPATCH_MAX_BAD to drop them"
        )
    return out


def _is_bad_input(exc: BaseException) -> bool:
    if isinstance(exc, core.SampleError):
        return "placeholders" in exc.reason
    return isinstance(exc, OSError) or type(exc).__name__ in ("UnidentifiedImageError", "DecompressionBombError")


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


def wrappers(spec, version=None) -> dict:
    global _spec, _active
    _spec = spec
    _active = spec.active_parts(version) if version is not None else {p.name for p in spec.parts}
    _finders.clear()
    return WRAPPERS
