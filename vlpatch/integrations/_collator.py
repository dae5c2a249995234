"""What the collator integrations share: media runs found from the matrix's token table, a collated batch
cut row by row with whole media runs (`core.fit_sequence`; preference pairs together with
`core.resolve`), and the batch tensors rebuilt without the dropped rows and removed media.

Trainer-independent: `vlpatch.integrations.unsloth` (UnslothVisionDataCollator) and
`vlpatch.integrations.trl` (TRL's vision collators) each hold a `CollatorPatch`: the trainer name for the report,
the matrix options of their patch (`media_tokens`, `pixel_layout`, `video_runs`, `audio_tensors`, gathered
from the matrix's `processors:` section for the classes the patch covers), the
finder cache and the name of the length setting. A batch left empty raises `EmptyBatchError`; a processor
the matrix has no token table for is left to upstream, warned once (`CollatorPatch.covers`).
"""

from __future__ import annotations

import logging
from collections import Counter

from .. import core, engine, report
from . import _media

logger = logging.getLogger("vlpatch")

DEFAULT_REPORT = "vlpatch_report.jsonl"  # in the working directory: a collator does not know output_dir


class EmptyBatchError(core.VLPatchError):
    """Every example of a batch was dropped: filter the dataset before training (each collator
    integration's `filter_dataset`)."""


_warned: set = set()  # (trainer, processor class name): warned once that it is left to upstream


# media tensors that are never per-token, whatever their shape: input_features_mask [clips, frames] can
# match [batch, sequence] by chance (upstream's _truncate_sequence_tensors has the same warning)
_VIDEO_KEYS = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
_MEDIA_KEYS = frozenset(
    ("pixel_values", "image_grid_thw", "image_sizes", "aspect_ratio_ids", "aspect_ratio_mask", *_VIDEO_KEYS)
)


class CollatorPatch:
    """One patched collator's state and what it does with a batch: its matrix options (`spec`, set when the
    engine attaches the patch: its integration's `wrappers`), its RunFinder per processor, the report path,
    the name of its length setting; finding the media runs of a collated batch (`parse`, `check_table`),
    cutting it (`fit`), rebuilding its tensors (`rebuild`) and filtering a dataset (`filter_dataset`)."""

    def __init__(self, trainer: str, budget_name: str, filter_hint: str, report_path: str = DEFAULT_REPORT):
        self.trainer = trainer
        self.budget_name = budget_name  # max_seq_length (Unsloth), max_length (TRL)
        self.filter_hint = filter_hint
        self.report = report_path
        self.spec = None
        self.finders: dict = {}
        self.filtering: list = []  # filter_dataset: [dataset index, rows of that one-example batch, their codes]
        # policy shrink, a video message part naming a file: upstream's own reader, part -> frames
        # tensor (T, C, H, W) as the collator would read them, or None where the trainer reads none
        self.read_video = None
        # ... and the multiple its reader rounds a frame count asked for (`nframes`) to (Qwen-VL's: 2)
        self.frame_factor = 1

    @property
    def options(self) -> dict:
        """The matrix options of the attached patch ({} before it is attached)."""
        return self.spec.options if self.spec is not None else {}

    def attach(self, spec) -> None:
        """Take the options of patch `spec` (the engine attaching it); finders built before are dropped."""
        self.spec = spec
        self.finders.clear()

    def finder(self, processor):
        """The RunFinder of this processor class (None: not in the matrix's table, left to upstream),
        built once per processor object (`finders`: id -> (the processor, kept alive, its finder))."""
        key = id(processor)
        hit = self.finders.get(key)
        if hit is None:
            hit = (processor, self._build_finder(processor))
            self.finders[key] = hit
        return hit[1]

    def covers(self, processor, label: str) -> bool:
        """Whether the matrix has a token table for this processor; where not, it is left to upstream,
        which `label` (the trainer as users name it) then truncates: warned once per processor class."""
        if self.finder(processor) is not None:
            return True
        name = type(processor).__name__
        if (self.trainer, name) not in _warned:
            _warned.add((self.trainer, name))
            logger.warning("vlpatch: %s is not covered: %s truncates it as upstream does", name, label)
        return False

    def frame_groups(self, batch, processor):
        """For a processor whose videos are one run per frame group (matrix `options.video_runs`:
        `frame_groups`, Qwen3-VL: `<t seconds><|vision_start|> <|video_pad|> x h*w/merge^2 <|vision_end|>` for
        each of the video's t temporal patches): (groups, body tokens per group) per video of the batch, in
        order, from video_grid_thw. None for every other processor."""
        kind = self.options.get("video_runs", {}).get(type(processor).__name__)
        if kind != "frame_groups":
            return None
        grid = batch.get("video_grid_thw")
        if grid is None:
            return []
        merge = getattr(getattr(processor, "video_processor", None), "merge_size", None) or 2
        return [(int(t), int(h) * int(w) // (merge * merge)) for t, h, w in grid.tolist()]

    def merge_frame_groups(self, row, runs: list, groups: list, video: int, finder, processor) -> tuple:
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

    def _build_finder(self, processor) -> core.RunFinder | None:
        """A new RunFinder from the matrix's token table for this processor's class (None: no table)."""
        table = self.options.get("media_tokens", {}).get(type(processor).__name__)
        tokenizer = getattr(processor, "tokenizer", processor)
        return None if table is None else core.finder_from_table(table, tokenizer, processor, tokenizer)

    def pixel_layout(self, processor) -> str:
        """How a processor's pixel tensors hold images (matrix `options.pixel_layout`): grid / per_image / per_row."""
        return self.options.get("pixel_layout", {}).get(type(processor).__name__, "grid")

    def audio_tensors(self, processor) -> list:
        """The batch keys holding one entry per audio clip (matrix `options.audio_tensors`; Gemma 3n:
        input_features, input_features_mask), the first one counting the clips; [] where none is known."""
        return list(self.options.get("audio_tensors", {}).get(type(processor).__name__, []))

    def removable(self, kind: str, layout: str, processor) -> bool:
        """Whether items of `kind` can be taken out of this processor's batch tensors."""
        if kind == "image":
            return True
        if kind == "video":
            return layout == "grid"  # Qwen-VL: flat patches in pixel_values_videos, one video_grid_thw row each
        if kind == "audio":
            return bool(self.audio_tensors(processor))
        return False

    def parse(self, batch, finder, processor) -> list:
        """Per row of a collated batch: its unpadded positions, token ids, media runs and items per kind."""
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        B, L = ids.shape
        groups = self.frame_groups(batch, processor)  # Qwen3-VL: a video is one run per frame group
        video = 0  # batch-wide index of the next video
        parsed = []
        for i in range(B):
            if mask is None:
                pos, row = list(range(L)), ids[i].tolist()
            else:  # a boolean mask, not a list of positions: indexing by a list costs more than the rest of the parse
                keep = mask[i] != 0
                pos, row = keep.nonzero().flatten().tolist(), ids[i][keep].tolist()
            runs = finder.find(row)
            if groups is not None:
                runs, video = self.merge_frame_groups(row, runs, groups, video, finder, processor)
            parsed.append((pos, row, runs, finder.count_items(row, runs)))
        return parsed

    def expected_items(self, batch, layout: str, processor=None) -> dict:
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
        audio = self.audio_tensors(processor)
        if audio:
            value = batch.get(audio[0])
            out["audio"] = 0 if value is None else len(value)
        return out

    def check_table(self, parsed, batch, layout, processor) -> None:
        """Before cutting anything: the media runs the matrix's token table finds in input_ids must be the
        media the processor produced. A processor release that writes its media otherwise (transformers
        5.17 renamed Gemma3Processor.image_token) would otherwise be cut blindly: refuse, loudly."""
        found: Counter = Counter()
        for _, _, _, items in parsed:
            found.update(items)
        for kind, expected in self.expected_items(batch, layout, processor).items():
            if found.get(kind, 0) != expected:
                import importlib.metadata

                version = importlib.metadata.version("transformers")
                raise core.VLPatchError(
                    f"vlpatch: {found.get(kind, 0)} {kind} run(s) in this batch's input_ids, {expected} {kind}(s) in "
                    f"{type(processor).__name__}'s {'audio' if kind == 'audio' else 'pixel'} tensors (transformers "
                    f"{version}); the model's forward pass would fail on it. Either the chat template writes no "
                    f"placeholder for some {kind}s (does it render {{\"type\": \"{kind}\"}} message parts?), or the "
                    "processor writes them in a way the compat matrix does not describe, and vlpatch will not cut it "
                    "blindly: exclude the patch (VLPATCH_EXCLUDE) or upgrade vlpatch, and please report it"
                )

    def fit(self, collator, batch, budget: int, keep: str = "head", pairs: bool = False, pad_side: str | None = None,
            examples=None, recollate=None, shrunk: dict | None = None, firsts: list | None = None, frames: list | None = None):
        """Cut each row of a collated batch longer than `budget` with whole media runs (`core.fit_rows`,
        keeping the head or the tail), then rebuild the batch tensors without the dropped rows and removed
        media. `pairs`: the batch is [chosen rows..., rejected rows...] (TRL's preference collator): rows i
        and i + B/2 are one sample, decided together, so a pair is kept, cut, loses the same media or is
        dropped as one. `pad_side`: where the rebuilt rows are padded (None: the tokenizer's padding_side).

        Policy `shrink` needs `examples` (as upstream was handed them, untouched) and `recollate(examples)`
        (upstream's collator, uncut): a sample whose media do not fit is collated again alone with smaller
        images until it fits (`core.ShrinkPolicy`); then the batch is collated again with the downsized
        images, so the pixel tensors are the processor's own for them, and cut once more (`shrunk`: the
        shrink decisions of the first pass, reported with their sizes).

        `firsts`: per example, the media items of its first turn (`first_turn_items`), where known: media
        after them leave with the part of the row the cut removes (`media_left_with_turn`), as LLaMA-Factory's
        turn budget does; only the first turn's media go to the policy. `frames`: per example, its emptied
        conversation (`chat_frames`): the chat frame a row starts with stays beside its media."""
        import torch

        ids = batch["input_ids"]
        finder = self.finder(collator.processor)
        if ids.dim() != 2 or (ids.shape[1] <= budget and not shrunk):
            return self._uncut(batch, finder, collator.processor, pairs)
        cut = _Cut(self, collator, batch, budget, keep, pairs, finder, shrunk)
        cut.decide_all(examples, recollate, firsts, frames)
        if cut.to_shrink:  # collate again with the downsized images: the processor's own tensors for them
            again_examples = list(examples)
            for s, info in cut.to_shrink.items():
                again_examples[s] = _with_media(examples[s], *_resized_media(examples[s], info["sizes"], blank=False))
            return self.fit(collator, recollate(again_examples), budget, keep, pairs, pad_side, again_examples, recollate,
                            shrunk=cut.to_shrink, firsts=firsts, frames=frames)
        rows_kept, removed, base, rows = cut.apply()
        self._record(cut, rows, rows_kept, budget)
        return self.rebuild(collator, batch, rows_kept, removed, base, cut.layout, torch, pad_side)

    def _uncut(self, batch, finder, processor, pairs: bool):
        """A batch `fit` leaves as it is (nothing over the budget): its media runs checked against the
        pixel tensors where the processor is covered, its samples tallied as kept."""
        ids = batch["input_ids"]
        if ids.dim() == 2 and finder is not None:  # media without their placeholder fail in the forward pass
            self.check_table(self.parse(batch, finder, processor), batch, self.pixel_layout(processor), processor)
        if not self.filtering:
            report.tally(Counter({"kept": ids.shape[0] // (2 if pairs else 1)}), Counter())
        return batch

    def _record(self, cut, rows: list, rows_kept: list, budget: int) -> None:
        """Report a pass's rows and tallies (under `filter_dataset`: hand the rows to it); raise
        EmptyBatchError where no row of the batch is kept."""
        if self.filtering:  # filter_dataset reports what it removes; training reports its own cuts
            self.filtering[1].extend(rows)
            self.filtering[2].update(cut.reasons)
        else:
            report.write_rows(rows, self.report)
            report.tally(cut.counts, cut.reasons)
        if not rows_kept:
            names = ", ".join(dict.fromkeys(f"example {r['index']}" for r in rows))
            raise EmptyBatchError(
                f"vlpatch: every example of this batch was dropped ({names}: media do not fit "
                f"{self.budget_name}={budget}); filter the dataset first with {self.filter_hint}"
            )

    def rebuild(self, collator, batch, rows_kept, removed: dict, totals: Counter, layout, torch, pad_side=None):
        """The batch at the kept positions of the kept rows, without the removed media items.

        `removed`: kind -> batch-wide indices of the items that leave; `totals`: items per kind in the batch."""
        processor = collator.processor
        tokenizer = getattr(processor, "tokenizer", processor)
        B = batch["input_ids"].shape[0]
        new_len = max(len(p) for _, p in rows_kept)
        multiple = getattr(collator, "pad_to_multiple_of", None)
        if multiple and multiple > 1:  # as upstream pads
            new_len = -(-new_len // multiple) * multiple
        left = (pad_side or getattr(tokenizer, "padding_side", "right")) == "left"
        pad_values = {"input_ids": tokenizer.pad_token_id or 0, "labels": getattr(collator, "ignore_index", -100)}
        audio_keys = self.audio_tensors(processor)
        per_token = _take_positions(batch, rows_kept, new_len, left, pad_values, _MEDIA_KEYS | set(audio_keys), torch)
        if layout == "per_row" and len(rows_kept) != B:  # pixel_values, aspect ratios ...: one entry per row
            keep_rows = [i for i, _ in rows_kept]
            for key, value in list(batch.items()):
                if key not in per_token and torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == B:
                    batch[key] = value[keep_rows]
        elif removed.get("image"):
            skip = per_token | set(audio_keys) | set(_VIDEO_KEYS)
            drop_images(batch, sorted(set(removed["image"])), totals["image"], layout, skip, torch)
        if removed.get("video"):
            drop_grid(batch, sorted(set(removed["video"])), "pixel_values_videos", "video_grid_thw", ("second_per_grid_ts",))
        if removed.get("audio"):
            drop_entries(batch, sorted(set(removed["audio"])), totals["audio"], audio_keys, processor)
        return batch

    def shrink_items(self, example, cfg) -> dict:
        """{key: core.ShrinkItem} of an example's images and videos: a video given as frames by its frame
        list; one given as a file by what the trainer's own reader makes of it (`CollatorPatch.read_video`: the
        frames it samples, at the size it resizes them to)."""
        floor_px = int(cfg.shrink_min_pixels)
        items = {}
        for k, (_, image) in enumerate(_image_slots(example)):
            size = _media.open_image(image).size
            items[("image", k)] = core.ShrinkItem(size, size, floor_px)
        for k, (_, part) in enumerate(_video_slots(example)):
            frames = part["video"]
            try:
                if isinstance(frames, (list, tuple)) and frames:
                    n, size = len(frames), _media.open_image(frames[0]).size
                elif isinstance(frames, str) and self.read_video is not None:
                    shape = self.read_video(dict(part)).shape  # (T, C, H, W)
                    n, size = int(shape[0]), (int(shape[3]), int(shape[2]))
                else:
                    continue
            except Exception:  # unreadable: upstream says so when it collates
                continue
            step = self.frame_factor if isinstance(frames, str) else 1  # a file: its reader reads that multiple
            items[("video", k)] = core.ShrinkItem(size, size, floor_px, n, min(n, int(cfg.shrink_min_frames)), step)
        return items

    def shrinker(self, example, rows, recollate, finder, processor, cfg):
        """`reencode(scale)` for `core.fit_rows`: the example collated alone by upstream, its images and
        frame-list videos replaced by blank stand-ins of the candidate sizes (and frame counts). The media
        are measured on the first call (a video file read by upstream's reader), so only when the media that
        must stay do not fit, not for a cut of text alone."""
        measured: list = []

        def items():
            if not measured:
                try:
                    measured.append((self.shrink_items(example, cfg), None))
                except Exception as exc:
                    measured.append((None, exc))
            found, exc = measured[0]
            if exc is not None:
                raise core.ShrinkUnavailable(f"its media could not be measured: {type(exc).__name__}: {exc}")
            if not found:
                raise core.ShrinkUnavailable("nothing that must stay can be downsized here (audio, an in-memory video)")
            return found

        def collated(sizes):
            batch = recollate([_with_media(example, *_resized_media(example, sizes, blank=True))])
            parsed = self.parse(batch, finder, processor)
            return [(len(row), finder.assign_items(row, runs, its)) for _, row, runs, its in parsed]

        def reencode(scale):
            changed, floor, sharp = core.shrink_candidates(items(), scale)
            if not changed:
                return rows, [], True, None
            return ((collated(sizes), sizes, floor, None) for sizes in (sharp, changed) if sizes)

        return reencode

    def filter_dataset(self, dataset, collator, is_bad_input, prepare=None):
        """Keep the examples the patched collator would not drop (same arithmetic, one example at a time);
        see `vlpatch.integrations.unsloth.filter_dataset`. `prepare(example)`: what the collator is handed
        (a copy, where the collator changes its examples in place)."""
        removed: list = []
        reasons: Counter = Counter()  # the removed examples' reason codes
        seen = [0]
        cfg = engine.config()

        def fits(example, index) -> bool:
            seen[0] += 1
            return self._fits_alone(collator, example, index, is_bad_input, prepare, (removed, reasons), cfg)

        if hasattr(dataset, "filter"):
            out = dataset.filter(fits, with_indices=True)
        else:
            out = [ex for i, ex in enumerate(dataset) if fits(ex, i)]
        report.write_rows(removed, self.report)
        report.tally(Counter({"dropped": len(removed)}), reasons)
        _refuse_too_much_bad(removed, reasons.get("bad_input", 0), seen[0], cfg.max_bad)
        return out

    def _fits_alone(self, collator, example, index: int, is_bad_input, prepare, out: tuple, cfg) -> bool:
        """Whether the patched collator keeps dataset[`index`] collated alone; the report rows of what it
        drops and their reason codes go to `out` (rows, Counter) (bad input too, where `is_bad_input` owns
        it and the policy does not stop)."""
        removed, reasons = out
        self.filtering[:] = [index, [], Counter()]
        try:
            collator([prepare(example) if prepare else example])
            return True
        except EmptyBatchError:
            removed.extend({**row, "index": index, "stage": "filter_dataset"} for row in self.filtering[1])
            reasons.update(self.filtering[2])
            return False
        except Exception as exc:  # bad input: a placeholder count that differs, an unreadable image
            if not is_bad_input(exc) or core.get_policy(cfg.policy).stops:
                raise
            why = exc.reason + (f" ({exc.detail})" if exc.detail else "") if isinstance(exc, core.SampleError) else f"{type(exc).__name__}: {exc}"
            removed.append({"trainer": self.trainer, "index": index, "stage": "filter_dataset", "action": "dropped",
                            "reason": f"bad_input: {why}"[:500]})
            reasons["bad_input"] += 1
            return False
        finally:
            self.filtering.clear()


def _refuse_too_much_bad(removed: list, bad: int, seen: int, max_bad: float) -> None:
    """Raise VLPatchError where `filter_dataset` found more bad input than VLPATCH_MAX_BAD allows (a wrong
    path loses much of a dataset: stop, do not filter it away), naming the first bad examples."""
    if core.too_much_bad(bad, seen, max_bad):
        first = "; ".join(f"example {r['index']}: {r['reason'][:160]}" for r in removed if r["reason"].startswith("bad_input"))
        raise core.VLPatchError(
            f"vlpatch: {bad} of {seen} examples ({bad / seen:.0%}) have bad input, more than VLPATCH_MAX_BAD "
            f"({max_bad:.0%}). First: {first[:600]}. Fix the data, or raise VLPATCH_MAX_BAD to drop them"
        )


def first_turn_items(example) -> int | None:
    """Media items of an example's first user turn (its messages before the first assistant message),
    or None where that is not known (no messages with typed parts, no assistant message)."""
    if not isinstance(example, dict):
        return None
    messages = example.get("messages", example.get("conversations"))
    if not isinstance(messages, (list, tuple)):
        return None
    n = 0
    for message in messages:
        if not isinstance(message, dict):
            return None
        if (message.get("role") or message.get("from")) in ("assistant", "gpt", "model"):
            return n
        content = message.get("content")
        if not isinstance(content, (list, tuple)):
            return None  # a plain string: where its media sit is up to the template
        n += sum(1 for part in content if isinstance(part, dict) and part.get("type") in ("image", "video", "audio"))
    return None


def chat_frames(examples, key: str | None = None) -> list | None:
    """Per example, its conversation (`key`, else `messages` or `conversations`: a preference pair's
    `prompt`) with every user and assistant message's content left out (None without messages): read
    before upstream, which changes its examples in place. Encoded by the processor's chat template only
    for a row that must be cut (`_frame_candidates`); what the row shares with that encoding at its start is its
    chat frame (template prefix, system block, first role header)."""
    out = []
    for example in examples if isinstance(examples, (list, tuple)) else ():
        messages = None
        if isinstance(example, dict):
            messages = example.get(key) if key else example.get("messages", example.get("conversations"))
        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
            out.append(None)
            continue
        out.append(core.emptied(messages))
    return out


def _frame_candidates(processor, emptied) -> list:
    """The emptied conversation as the template writes it, tokenized with and without the tokenizer's
    special tokens ([] where the template refuses an empty message): a row's chat frame is its longest
    common prefix with either (`core.frame_of`). Rendered once per example: a pair's rows share it."""
    if not emptied or not hasattr(processor, "apply_chat_template"):
        return []
    tokenizer = getattr(processor, "tokenizer", processor)
    try:
        text = processor.apply_chat_template(emptied, tokenize=False, add_generation_prompt=False)
        return [tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer(text)["input_ids"]]
    except Exception:  # noqa: BLE001 - a template that needs content: no frame known
        return []


class _Cut:
    """One pass of `fit` over a collated batch that holds a row longer than the budget: each sample's
    decision (`decide_all`), then the kept positions, the media that leave and the report rows (`apply`)."""

    def __init__(self, site, collator, batch, budget, keep, pairs, finder, shrunk):
        self.site, self.processor, self.budget, self.keep, self.pairs = site, collator.processor, budget, keep, pairs
        self.finder, self.shrunk = finder, shrunk
        cfg = engine.config()
        self.cfg = cfg
        # the second pass of shrink: what still does not fit goes to the fallback
        self.policy = core.get_policy(cfg.shrink_fallback) if shrunk is not None else core.get_policy(cfg.policy, cfg.shrink_fallback)
        self.layout = site.pixel_layout(self.processor)
        B = batch["input_ids"].shape[0]
        self.parsed = site.parse(batch, finder, self.processor)
        site.check_table(self.parsed, batch, self.layout, self.processor)
        self.half = B // 2 if pairs else B
        self.samples = [(i, i + self.half) for i in range(self.half)] if pairs else [(i,) for i in range(B)]
        self.decided: dict = {}  # row -> (decision, index of the row's layout in it, sample index)
        self.runs_of: dict = {}
        self.to_shrink: dict = {}  # sample -> its shrink decision (first pass)
        self.counts, self.reasons = Counter(), Counter()

    def error_row(self, s: int) -> dict:
        """The report row of sample `s` when it stops the run (under filter_dataset: its dataset index)."""
        err = {"trainer": self.site.trainer, "index": s, "action": "error", "budget": self.budget}
        if self.site.filtering:
            err = {**err, "index": self.site.filtering[0], "stage": "filter_dataset"}
        return err

    def decide_all(self, examples, recollate, firsts, frames) -> None:
        can_shrink = core.get_policy(self.cfg.policy).reencodes and self.shrunk is None and examples is not None and recollate is not None
        for s, members in enumerate(self.samples):
            parsed = self.parsed
            if all(len(parsed[i][1]) <= self.budget for i in members):
                if self.shrunk and s in self.shrunk:  # shrunk, and now whole
                    for k, i in enumerate(members):
                        self.runs_of[i] = self.finder.assign_items(parsed[i][1], parsed[i][2], parsed[i][3])
                        whole = [list(range(len(parsed[j][1]))) for j in members]
                        self.decided[i] = (core.Decision("shrunk", whole, reason=self.shrunk[s]["reason"], code="media_shrunk"), k, s)
                    self.counts["shrunk"] += 1
                    self.reasons["media_shrunk"] += 1
                    continue
                self.counts["kept"] += 1
                continue
            for i in members:
                self.runs_of[i] = self.finder.assign_items(parsed[i][1], parsed[i][2], parsed[i][3])
            again = examples[s] if can_shrink else None
            decision = self.decide(s, members, again, recollate, firsts, frames)
            if decision is None:
                continue
            for k, i in enumerate(members):
                self.decided[i] = (decision, k, s)
            self.counts[decision.action] += 1
            self.reasons[decision.code] += 1

    def decide(self, s, members, example, recollate, firsts, frames):
        """Sample `s`'s decision (None: it is shrunk, and collated again with its new sizes)."""
        site, parsed, pairs = self.site, self.parsed, self.pairs
        sample = f"dataset[{site.filtering[0]}]" if site.filtering else f"batch example {s}"
        if pairs:
            sample += " (chosen and rejected)"
        try:
            rows_of = [(len(parsed[i][1]), self.runs_of[i]) for i in members]
            again = site.shrinker(example, rows_of, recollate, self.finder, self.processor, self.cfg) if example is not None else None
            first = firsts[s] if firsts and not pairs and s < len(firsts) else None
            heads = None
            if frames and s < len(frames):
                candidates = _frame_candidates(self.processor, frames[s])
                heads = [max((core.frame_of(parsed[i][1], c) for c in candidates), default=0) for i in members]
            decision = core.fit_rows(rows_of, self.budget, self.policy, sample, keep="head" if pairs else self.keep, reencode=again,
                                     first=first, heads=heads)
            if decision.action == "shrunk":
                self.to_shrink[s] = _shrink_info(decision, rows_of)
                return None
            if self.shrunk and s in self.shrunk and decision.action in ("kept", "truncated"):
                decision.action, decision.code = "shrunk", "media_shrunk"
                decision.reason = self.shrunk[s]["reason"] + ("; " + decision.reason if decision.reason else "")
            if decision.removed and self.layout == "per_row":  # one image cannot leave a row's pixel slots
                why = f"{decision.reason}; {type(self.processor).__name__} keeps images per row: example dropped"
                decision = core.Decision("dropped", None, reason=why, code=decision.code)
        except core.SampleError:
            report.write_rows([{**self.error_row(s), "reason": "media_exceed_budget"}], site.report)
            raise
        return decision

    def apply(self) -> tuple:
        """(rows kept with their kept positions, kind -> batch-wide indices of the items that leave,
        items per kind in the batch, report rows)."""
        rows_kept, rows = [], []
        removed: dict = {}  # kind -> batch-wide indices of the items that leave
        base: Counter = Counter()  # kind -> batch-wide index of this row's first item
        for i, (pos, row, runs, items) in enumerate(self.parsed):
            if i in self.decided:
                self.apply_row(i, pos, row, items, rows_kept, removed, base, rows)
            else:
                rows_kept.append((i, pos))
            base.update(items)
        return rows_kept, removed, base, rows

    def apply_row(self, i, pos, row, items, rows_kept, removed, base, rows) -> None:
        decision, k, s = self.decided[i]
        site, layout, processor = self.site, self.layout, self.processor
        runs = self.runs_of[i]
        part = {"part": "chosen" if i < self.half else "rejected"} if self.pairs else {}
        entry = {
            "trainer": site.trainer, "index": s, **part, "budget": self.budget, "tokens_before": len(row),
            "media": {"image": items["image"], **{k: n for k, n in sorted(items.items()) if n and k != "image"}},
        }
        # the kinds this decision takes out: every item of the row when it is dropped, else those removed
        leaving = {kind for kind, n in items.items() if n} if decision.action == "dropped" else {k for k, _ in decision.removed}
        if decision.action == "dropped" and layout == "per_row":
            leaving = set()  # per-row tensors leave with their row
        stuck = sorted(kind for kind in leaving if not site.removable(kind, layout, processor))
        if stuck:  # kept whole when text is cut, but this processor's tensors for them cannot be taken apart
            what = ", ".join(f"{kind}s" for kind in stuck)
            why = f"{type(processor).__name__} {what} cannot be taken out of its batch tensors ({decision.reason})"
            report.write_rows([{**self.error_row(s), "reason": "media_not_removable: " + why}], site.report)
            raise core.SampleError(
                f"batch example {s}" if not site.filtering else f"dataset[{site.filtering[0]}]",
                f"a sample with {what} does not fit {site.budget_name}", why + "; filter the dataset first",
            )
        if decision.action == "dropped":
            for kind in leaving:
                removed.setdefault(kind, []).extend(range(base[kind], base[kind] + items[kind]))
            rows.append({**entry, "action": "dropped", "reason": decision.reason})
            return
        kept = decision.kept[k]
        gone: dict = {}
        for kind, n in sorted(decision.removed):
            gone.setdefault(kind, []).append(n)
            removed.setdefault(kind, []).append(base[kind] + n)
        rows_kept.append((i, [pos[p] for p in kept]))
        if self.pairs and len(kept) == len(row) and decision.action != "shrunk":
            return  # the other row of the pair was cut: this one is whole (no report row)
        extra = {}
        if decision.action == "shrunk":
            info = self.shrunk[s]
            extra = {"tokens_before": info["tokens_before"][k], "media_tokens": info["media_tokens"][k], "media_resized": info["resized"]}
        rows.append({
            **entry,
            "action": decision.action,
            "reason": decision.reason or "text_over_budget",
            "tokens_after": len(kept),
            "media_tokens": core.run_tokens(runs),
            "media_tokens_after": core.run_tokens(runs, decision.removed),
            "media_removed": gone,
            **extra,
        })


# --------------------------------------------------------------------------- policy shrink


def copies_for_shrink(examples, always: bool = False):
    """Deep copies of the examples under policy `shrink` (upstream's collators may change their
    examples in place, and shrink hands some of them to upstream again); else None."""
    if not always and not core.get_policy(engine.config().policy).reencodes:
        return None
    import copy

    return [copy.deepcopy(e) for e in examples] if isinstance(examples, (list, tuple)) else None


def _image_slots(example) -> list:
    """Where an example's images are, in the order the collators hand them to the processor: the
    `images` column (or TRL's single `image`), else the `{"type": "image", "image": ...}` parts of its
    messages. Each slot: (path of keys and indices, the image)."""
    if not isinstance(example, dict):
        return []
    column = example.get("images")
    if isinstance(column, (list, tuple)):
        return [(("images", k), img) for k, img in enumerate(column)]
    if column is not None:
        return [(("images",), column)]
    if example.get("image") is not None:
        return [(("image",), example["image"])]
    return [(path + ("image",), part["image"]) for path, part in _parts(example, "image")]


def _parts(example, kind: str) -> list:
    """An example's `{"type": kind, kind: ...}` message parts, in order: (path of keys and indices to
    the part, the part)."""
    if not isinstance(example, dict):
        return []
    slots = []
    for key in ("messages", "conversations", "prompt", "completion", "chosen", "rejected"):
        messages = example.get(key)
        if not isinstance(messages, (list, tuple)):
            continue
        for m, message in enumerate(messages):
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, (list, tuple)):
                for c, part in enumerate(content):
                    if isinstance(part, dict) and part.get("type") == kind and part.get(kind) is not None:
                        slots.append(((key, m, "content", c), part))
    return slots


def _with_media(example, images: dict, videos: dict | None = None):
    """A copy of `example` with image k replaced by `images[k]` and video k's message part by
    `videos[k]` (the containers on the way copied, the rest shared); a message part that names its size
    (`resized_width` / `resized_height`) gets the new one."""
    import copy

    slots, parts = _image_slots(example), _video_slots(example) if videos else []
    values = {slots[k][0]: image for k, image in images.items()}
    values.update({parts[k][0]: part for k, part in (videos or {}).items()})
    out = copy.copy(example)
    for path, value in values.items():
        node = out
        for step in path[:-1]:
            child = node[step]
            child = list(child) if isinstance(child, tuple) else copy.copy(child)
            node[step] = child
            node = child
        node[path[-1]] = value
        if isinstance(node, dict) and "resized_width" in node and hasattr(value, "size"):
            node["resized_width"], node["resized_height"] = value.size
    return out


def _resize(image, size):
    from PIL import Image

    im = _media.open_image(image)
    return im.resize(size, Image.BICUBIC)


def _video_slots(example) -> list:
    return _parts(example, "video")


def _resized_media(example, sizes: list, blank: bool) -> tuple:
    """(images, videos) for `_with_media`: each item of `sizes` ((kind, k), before, after) at its new
    size, blank stand-ins (token counts depend on sizes and frame counts only) or really downsized."""
    from PIL import Image

    images, videos = {}, {}
    slots, parts = _image_slots(example), _video_slots(example)
    for (kind, k), _before, after in sizes:
        size = tuple(after[:2])
        if kind == "image":
            images[k] = Image.new("RGB", size) if blank else _resize(slots[k][1], size)
        elif isinstance(parts[k][1]["video"], str):  # a file: upstream reads that many frames at that size
            part = {key: v for key, v in parts[k][1].items() if key not in ("fps", "nframes", "min_frames", "max_frames")}
            part.update(nframes=after[2], resized_width=size[0], resized_height=size[1])
            videos[k] = part
        else:
            frames = parts[k][1]["video"]
            picked = core.pick_frames(len(frames), after[2])
            new = [Image.new("RGB", size)] * len(picked) if blank else [_resize(frames[p], size) for p in picked]
            part = {**parts[k][1], "video": new}
            if "resized_width" in part:
                part["resized_width"], part["resized_height"] = size
            videos[k] = part
    return images, videos


def _shrink_info(decision, rows_before) -> dict:
    """What the second pass needs of a first-pass shrink decision: the new sizes, the reason, and for the
    report each row's tokens and each item's tokens before."""
    runs_before, runs_after = rows_before[0][1], decision.resized.layouts[0].runs
    resized = [report.resized_row(key, b, a, runs_before, runs_after) for key, b, a in decision.resized.sizes]
    return {
        "sizes": decision.resized.sizes,
        "reason": decision.reason,
        "tokens_before": [n for n, _ in rows_before],
        "media_tokens": [core.run_tokens(runs) for _, runs in rows_before],
        "resized": resized,
    }


def _take_positions(batch, rows_kept, new_len: int, left: bool, pad_values: dict, media_keys, torch) -> set:
    """Replace each per-token tensor of the batch ([batch, sequence, ...], never one of `media_keys`) by
    its kept rows at their kept positions, padded to `new_len` on the left or the right; returns their keys."""
    B, L = batch["input_ids"].shape
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
    return per_token


def drop_grid(batch, removed: list, pixel_key: str, grid_key: str, companions: tuple = ()):
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


def drop_images(batch, removed: list, n_images: int, layout: str, skip: set, torch):
    """Take removed images out of the pixel tensors: Qwen-VL's flat patches with one image_grid_thw row
    per image (`grid`), or one entry per image in pixel_values and its companions (`per_image`: Gemma 3,
    Pixtral's image_sizes; never the per-token, video or audio tensors in `skip`)."""
    gone = set(removed)
    pixels = batch["pixel_values"]
    if layout == "grid":
        drop_grid(batch, removed, "pixel_values", "image_grid_thw")
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


def drop_entries(batch, removed: list, n_items: int, keys: list, processor):
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


