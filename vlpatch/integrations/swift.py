"""ms-swift: `Template._encode_truncated` with whole media spans, and no silent swap of over-long rows.

Which symbols and versions: `compat_matrix.yaml` (patches `swift.truncation`, 4.x, and
`swift.truncation_3x`, the same code under `swift.llm` in 3.x). Upstream encodes a row
(media already expanded into their pad tokens), then measures it against `max_length`: `raise` (the
CLI's default `--truncation_strategy delete`) raises `MaxLengthError`, which `LazyLLMDataset` answers
by encoding another row instead, without a word (`--lazy_tokenize false`: the row is deleted, one count
line); `right` / `left` (`Template._truncate`) keep every pad token and fill the rest with the first /
last other tokens, so media markers, the chat frame and the answer are lost and media that alone exceed
`max_length` stay whole in an over-long row.

The wrapper encodes the row with `max_length` unset, then:
- `right` / `left`: cuts it as one window per side of each turn (prompt and answer, `core.seqlen_split`,
  LLaMA-Factory's arithmetic: the answer keeps its share), each media item's span (start marker, pads,
  end marker) kept or left whole, the chat frame of the first turn (template prefix, system block,
  role header) kept with its media and at least `core.ANSWER_FLOOR` of the answer; `left` spends the
  budget on the latest turns first. Media of a later turn that the budget cuts off leave with it.
  Media that do not fit go to the policy: `drop` (the row is deleted as upstream deletes it),
  `drop_media`, `shrink` (images downsized and the row encoded again), `error`. Every per-token list
  and tensor (labels, loss_scale, mm_token_type_ids) follows the kept positions; the pixel tensors
  and grids of media that leave are taken out. Under Megatron context parallelism the cut row is padded
  to upstream's multiple again (3.8 - 3.10 pad each row in `_encode_truncated`, which runs uncut here).
- `raise` (delete): the row is deleted as upstream deletes it, and reported.
Every row that is cut, loses media or is deleted gets a report row; under lazy tokenization a deleted
row names the row upstream served instead (`replaced_by`: upstream's own resampling is kept, so an
epoch keeps its length). Policy `error` stops the run: upstream's dataset would otherwise answer the
error by serving another row.
"""

from __future__ import annotations

import contextvars
import copy
import functools
from collections import Counter

from .. import core, engine, report
from ..errors import SampleError
from . import _collator

TRAINER = "ms-swift"
CUTS = ("right", "left", "raise")  # `split` (pretraining chunks) and None are left to upstream
MODES = ("train", "rlhf", "kto")  # vllm / lmdeploy / sglang encode without expanding media

SITES: dict = {}


def _site() -> _collator.CollatorPatch:
    return _collator.CollatorPatch(TRAINER, "max_length", "a larger --max_length or --truncation_strategy delete")


class _Fetch:
    """One row fetch of ms-swift's dataset (`LazyLLMDataset.__getitem__`, or a batch of the non-lazy
    `batched_preprocess`): which dataset row is encoded, the rows deleted on the way (reported when the
    fetch ends, with the row served instead), and an error of policy `error` (raised when it ends)."""

    def __init__(self, dataset=None, index=None):
        self.dataset, self.index = dataset, index
        self.tries = 0  # `Template.encode` calls: the first encodes the row asked for, later ones a replacement
        self.deleted: list = []
        self.error: BaseException | None = None

    def row(self):
        """The dataset index of the row being encoded (None: not known)."""
        if self.dataset is None or self.index is None:
            return None
        if self.tries <= 1:
            return self.index
        order = getattr(self.dataset, "_idx_list", None)  # upstream's fallback permutation, just advanced
        n = len(order or ())
        return order[(self.dataset._idx - 1) % n] if n else None


_FETCH: contextvars.ContextVar = contextvars.ContextVar("vlpatch_swift_fetch", default=None)
# rows this process has reported, by a hash of their uncut token ids: a row is reported once however often
# upstream encodes it (its 3 retries of any error, the example it prints before training, each epoch when
# lazy). Only over-long rows enter it, so it grows as the report does: one int per report row.
_TOLD: set = set()


def _first_time(ids) -> bool:
    """Whether the row with these (uncut) token ids is reported now: not yet reported by this process."""
    key = hash(tuple(ids))
    if key in _TOLD:
        return False
    _TOLD.add(key)
    return True


def _sample(fetch, inputs) -> tuple:
    """(report fields, name) of the row being encoded."""
    row = fetch.row() if fetch is not None else None
    if row is not None:
        return {"index": row}, f"dataset row {row}"
    text = next((m.get("content") for m in inputs.messages if m.get("role") == "user" and isinstance(m.get("content"), str)), "")
    snippet = " ".join(text.split())[:40]
    return {"sample": snippet}, f"row starting {snippet!r}"


def _covered(site, template) -> bool:
    return (template.max_length is not None and template.truncation_strategy in CUTS and template.mode in MODES
            and site.covers(template.processor, "ms-swift"))


def _encode_row(site, wrapped, template, args, kwargs):
    """`Template.encode(inputs)` (upstream's retry: each error makes it encode the row again, 3 times in
    all): one report per row, and which dataset row it is."""
    fetch = _FETCH.get()
    token = None
    if fetch is None:
        fetch = _Fetch()
        token = _FETCH.set(fetch)
    fetch.tries += 1
    try:
        return wrapped(*args, **kwargs)
    finally:
        if token is not None:
            _FETCH.reset(token)


def _encode(site, wrapped, template, args, kwargs):
    """`Template._encode_truncated(inputs)`."""
    if not _covered(site, template):
        return wrapped(*args, **kwargs)
    inputs = args[0] if args else kwargs["inputs"]
    fetch = _FETCH.get()
    cfg = engine.config()
    pristine = copy.deepcopy(inputs) if core.get_policy(cfg.policy).reencodes else None
    encoded = _uncut(wrapped, template, args, kwargs)
    budget = template.max_length
    if len(encoded["input_ids"]) <= budget:
        if _first_time(encoded["input_ids"]):
            report.tally(Counter({"kept": 1}), Counter())
        return encoded
    align = _alignment(template)
    row = _Row(site, template, inputs, _unpad(encoded, align, template), budget - budget % align, fetch)
    if template.truncation_strategy == "raise":
        return row.delete(**core.because("truncation_strategy_delete", f"{row.length} tokens over max_length {budget}"))
    policy = core.get_policy(cfg.policy, cfg.shrink_fallback)
    return row.cut(policy, pristine, functools.partial(_uncut, wrapped, template))


def _uncut(wrapped, template, args, kwargs=None):
    budget = template.max_length
    template.max_length = None
    try:
        return wrapped(*args, **(kwargs or {}))
    finally:
        template.max_length = budget


def _max_length_error(template):
    """ms-swift's `MaxLengthError`, from the module that defines the template's `_encode_truncated`
    (swift.template.base on 4.x, swift.llm.template.base on 3.x)."""
    import sys

    owner = next(c for c in type(template).__mro__ if "_encode_truncated" in vars(c))
    return sys.modules[owner.__module__].MaxLengthError


class _Row:
    """One encoded row longer than `max_length`: its media runs, turns and chat frame, and what to do."""

    def __init__(self, site, template, inputs, encoded, budget, fetch):
        self.site, self.template, self.inputs, self.encoded, self.budget, self.fetch = site, template, inputs, encoded, budget, fetch
        self.ids = encoded["input_ids"]
        self.length = len(self.ids)
        self.finder = site.finder(template.processor)
        self.items = Counter({"image": len(inputs.images or ()), "video": len(inputs.videos or ())})
        self.fields, self.name = _sample(fetch, inputs)
        self.fresh = _first_time(self.ids)  # False: a row already reported (an upstream retry, a later epoch)
        self._empty = None
        self.entry = {"trainer": TRAINER, **self.fields, "budget": budget, "tokens_before": self.length,
                      "media": {k: n for k, n in sorted(self.items.items()) if n or k == "image"}}

    def runs(self, encoded):
        """The media runs of an encoded row, each given its item (a Qwen3-VL video's frame groups as one run)."""
        ids, processor = encoded["input_ids"], self.template.processor
        runs = self.finder.find(ids)
        groups = self.site.frame_groups(encoded, processor)
        if groups is not None:
            runs, _ = self.site.merge_frame_groups(ids, runs, groups, 0, self.finder, processor)
        return self.finder.assign_items(ids, runs, self.items)

    def delete(self, code: str, reason: str):
        """Delete the row as upstream deletes an over-long one (`MaxLengthError`), reported."""
        row = {**self.entry, "action": "dropped", "reason": reason}
        if self.fresh:
            report.tally(Counter({"dropped": 1}), Counter({code: 1}))
            if self.fetch is not None and self.fetch.dataset is not None:
                self.fetch.deleted.append(row)  # written when the fetch ends, with the row served instead
            else:
                report.write_rows([row], self.site.report)
        raise _max_length_error(self.template)(f"vlpatch: {self.name}: {reason}")

    def layouts(self, encoded, runs) -> list:
        """One turn per answer (the prompt before it, the answer with its assistant header), in the order
        the budget is spent (`left`: the latest turn first), the first turn's chat frame at its head."""
        ids, labels = encoded["input_ids"], encoded.get("labels")
        length = len(ids)
        answers = _answers(labels)
        empty_ids, empty_answers = self.empty()
        head = core.frame_of(ids, empty_ids) if empty_ids else 0
        same = len(empty_answers) == len(answers)
        turns, tails, start, e_start = [], [], 0, 0
        for k, (a, b) in enumerate(answers):
            # the assistant header that ends the prompt goes with the answer: a row keeps it with its answer
            tail = _common_suffix(ids[start:a], empty_ids[e_start : empty_answers[k][0]]) if same else 0
            turns.append((range(start, a - tail), range(a - tail, b)))
            tails.append(tail)
            start, e_start = b, (empty_answers[k][1] if same else 0)
        if not turns:
            turns, tails = [(range(0, length), range(length, length))], [0]
        elif start < length:  # what follows the last answer (a suffix) goes with it
            turns[-1] = (turns[-1][0], range(turns[-1][1].start, length))
        heads, reserved = [head] + [0] * (len(turns) - 1), 0
        if not runs:  # text alone (the core keeps no frame in a turn without media): the frame is held apart
            heads, reserved = [0] * len(turns), min(head, turns[0][0].stop)
            turns[0] = (range(reserved, turns[0][0].stop), turns[0][1])
        if self.template.truncation_strategy == "left":  # the latest turns first
            for part in (turns, heads, tails):
                part.reverse()
        return [core.Layout(length, runs, turns, self.budget, core.seqlen_split, reserved=reserved, heads=heads, tails=tails)]

    def empty(self) -> tuple:
        """(ids, answers) of the conversation encoded with the content of every user and assistant
        message left out (`core.emptied`): its head is the row's chat frame, the end of each prompt its
        assistant header. ([], []) where the template cannot encode it."""
        if self._empty is None:
            empty = type(self.inputs)(messages=core.emptied(self.inputs.messages), system=self.inputs.system)
            try:
                self.template._preprocess_inputs(empty)
                got = self.template._encode(empty)
                self._empty = (got["input_ids"], _answers(got.get("labels")))
            except Exception:  # noqa: BLE001 - a template that cannot encode an empty turn: no frame known
                self._empty = ([], [])
        return self._empty

    def cut(self, policy, pristine, uncut):
        runs = self.runs(self.encoded)
        again = _shrinker(self, pristine, uncut) if pristine is not None else None
        try:
            decision = core.resolve(self.layouts(self.encoded, runs), policy, self.name, again)
        except SampleError as exc:
            if self.fresh:
                report.write_rows([{**self.entry, "action": "error", "reason": "media_exceed_budget"}], self.site.report)
            if self.fetch is not None:
                self.fetch.error = exc
            raise
        if decision.action == "dropped":
            return self.delete(decision.code, decision.reason)
        if decision.removed and self.template.mode != "train":  # chosen and rejected are encoded apart
            return self.delete(decision.code, f"{decision.reason}; a preference pair keeps its media together: row deleted")
        encoded, runs_now = self.encoded, runs
        extra = {}
        if decision.resized is not None:
            encoded = decision.resized.payload
            runs_now = decision.resized.layouts[0].runs
            extra = {"media_resized": [report.resized_row(key, b, a, runs, runs_now) for key, b, a in decision.resized.sizes]}
        kept = decision.kept[0]
        layout = self.site.pixel_layout(self.template.processor)
        out = _rebuild(encoded, kept, decision.removed, layout, self.items["image"])
        _align(out, _alignment(self.template), self.template.tokenizer.pad_token_id)
        gone: dict = {}
        for kind, n in sorted(decision.removed):
            gone.setdefault(kind, []).append(n)
        row = {**self.entry, "action": decision.action, "reason": decision.reason or "text_over_budget",
               "tokens_after": len(kept), "media_tokens": core.run_tokens(runs_now),
               "media_tokens_after": core.run_tokens(runs_now, decision.removed),
               "media_removed": gone, **_answer_tokens(encoded.get("labels"), kept), **extra}
        if self.fresh:
            report.write_rows([row], self.site.report)
            report.tally(Counter({decision.action: 1}), Counter({decision.code: 1}))
        return out


def _answer_tokens(labels, kept) -> dict:
    """Report fields: the row's answer tokens (supervised labels) before and after the cut."""
    if not labels:
        return {}
    return {"answer_tokens_before": sum(1 for x in labels if x != -100),
            "answer_tokens_after": sum(1 for p in kept if labels[p] != -100)}


def _common_suffix(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def _answers(labels) -> list:
    """The supervised spans of `labels` ([start, stop) of each run of positions that are not -100)."""
    spans, start = [], None
    for p, label in enumerate(labels or ()):
        if label != -100 and start is None:
            start = p
        elif label == -100 and start is not None:
            spans.append((start, p))
            start = None
    if start is not None:
        spans.append((start, len(labels)))
    return spans


# the per-token lists of an encoded row beside input_ids, each with what a pad position holds (no label, no loss)
_PAD_FILL = {"labels": -100, "loss_scale": 0, "mm_token_type_ids": 0, "image_token_types": 0, "token_type_ids": 0}
_PER_TOKEN = tuple(_PAD_FILL)
_VIDEO_GRID = ("pixel_values_videos", "video_grid_thw", ("second_per_grid_ts",))


def _rebuild(encoded: dict, kept: list, removed, layout: str = "grid", n_images: int = 0) -> dict:
    """`encoded` at the kept positions, without the pixel rows (and grids) of the media that leave; `layout`:
    how the processor's pixel_values hold the row's `n_images` images (`grid`: Qwen-VL, `per_image`: Gemma 3)."""
    import torch

    out = dict(encoded)
    n = len(encoded["input_ids"])
    out["input_ids"] = [encoded["input_ids"][p] for p in kept]
    for key in _PER_TOKEN:
        value = encoded.get(key)
        if value is None or len(value) != n:
            continue
        out[key] = value[kept] if hasattr(value, "index_select") else [value[p] for p in kept]
    images = sorted(k for kind, k in removed if kind == "image")
    if images and out.get("pixel_values") is not None:
        _collator.drop_images(out, images, n_images, layout, set(_PER_TOKEN), torch)
    videos = sorted(k for kind, k in removed if kind == "video")
    if videos and out.get(_VIDEO_GRID[1]) is not None:
        _collator.drop_grid(out, videos, *_VIDEO_GRID)
    out["length"] = len(kept)
    return out


def _alignment(template) -> int:
    """The multiple a row's length must be: 2 x `sequence_parallel_size` under Megatron context parallelism
    (`use_megatron`), else 1. ms-swift pads every row to it: 3.8 - 3.10 in `_encode_truncated`, which
    vlpatch calls uncut (so the cut row would lose it), later releases in the collator."""
    cp = getattr(template, "sequence_parallel_size", 1) or 1
    return 2 * cp if getattr(template, "use_megatron", False) and cp > 1 else 1


def _unpad(encoded: dict, multiple: int, template) -> dict:
    """The row without the padding upstream gave it (`_alignment`: fewer than `multiple` pad tokens at its
    end, without labels), so that the cut spends no budget on it; `_align` pads the cut row again."""
    ids, labels = encoded["input_ids"], encoded.get("labels")
    pad, n, k = template.tokenizer.pad_token_id, len(encoded["input_ids"]), 0
    if multiple <= 1 or labels is None or pad is None or n % multiple:
        return encoded
    while k < min(multiple - 1, n - 1) and ids[n - 1 - k] == pad and labels[n - 1 - k] == -100:
        k += 1
    return _rebuild(encoded, list(range(n - k)), ()) if k else encoded


def _align(out: dict, multiple: int, pad_id) -> None:
    """Pad a cut row at its end to a multiple of `multiple`, as upstream pads it (pad tokens, no label, no
    loss); the budget was rounded down to a multiple, so the row stays within `max_length`."""
    n = len(out["input_ids"])
    extra = -n % multiple
    if not extra:
        return
    out["input_ids"] = out["input_ids"] + [pad_id] * extra
    for key, fill in _PAD_FILL.items():
        value = out.get(key)
        if value is None or len(value) != n:
            continue
        if hasattr(value, "new_full"):  # a tensor (mm_token_type_ids): text positions
            import torch

            out[key] = torch.cat([value, value.new_full((extra,), fill)])
        else:
            out[key] = list(value) + [fill] * extra
    out["length"] = n + extra


def _shrinker(row: _Row, pristine, uncut):
    """`reencode(scale)` for policy shrink: the row's images downsized (`core.ShrinkItem`), encoded again
    uncut (videos are not downsized: a sample whose images cannot make it fit goes to the fallback)."""
    items: dict = {}

    def measure():
        if not items:
            for k, image in enumerate(row.inputs.images or ()):
                size = getattr(image, "size", None)
                if size:
                    items[("image", k)] = core.ShrinkItem(seen=tuple(size), file=tuple(size), floor=_floor(row.template))
        if not items:
            raise core.ShrinkUnavailable("no image of this row can be downsized")
        return items

    def reencode(scale):
        changed, floor, _ = core.shrink_candidates(measure(), scale)
        if not changed:
            return None
        inputs = copy.deepcopy(pristine)
        images = list(row.inputs.images)  # as the template loaded and resized them
        for (kind, k), _before, after in changed:
            images[k] = images[k].resize(after)
        inputs.images = images
        encoded = _unpad(uncut((inputs,)), _alignment(row.template), row.template)
        runs = row.runs(encoded)
        return core.Resized(scale, row.layouts(encoded, runs), changed, floor, encoded)

    return reencode


def _floor(template) -> int:
    """The fewest pixels an image keeps: the image processor's own minimum (Qwen-VL: min_pixels)."""
    ip = getattr(template.processor, "image_processor", None)
    size = getattr(ip, "size", None) or {}
    return int(getattr(ip, "min_pixels", None) or size.get("shortest_edge") or 56 * 56)


# --------------------------------------------------------------------------- the dataset side


def _fetched(site, fetch: _Fetch, wrapped, args, kwargs):
    token = _FETCH.set(fetch)
    try:
        return wrapped(*args, **kwargs)
    finally:
        _FETCH.reset(token)
        if fetch.deleted:
            served = fetch.row() if fetch.error is None else None
            for row in fetch.deleted:
                if served is not None and served != row.get("index"):
                    row["replaced_by"] = served  # upstream serves another row in its place
            report.write_rows(fetch.deleted, site.report)
        if fetch.error is not None:
            raise fetch.error


def _lazy_row(site, wrapped, instance, args, kwargs):
    """`LazyLLMDataset.__getitem__(idx)`: name the row encoded (and the one served after a deletion)."""
    idx = args[0] if args else kwargs["idx"]
    if isinstance(idx, str) or not len(instance.dataset):
        return wrapped(*args, **kwargs)
    return _fetched(site, _Fetch(instance, idx % len(instance.dataset)), wrapped, args, kwargs)


def _batch_rows(site, wrapped, instance, args, kwargs):
    """`RowPreprocessor.batched_preprocess` (`--lazy_tokenize false`): policy `error` stops the run."""
    return _fetched(site, _Fetch(), wrapped, args, kwargs)


def details(spec) -> dict:
    return {"covered_processors": sorted(spec.options.get("media_tokens", {}))}


WRAPPERS = {"encode_row": _encode_row, "encode": _encode, "lazy_row": _lazy_row, "batch_rows": _batch_rows}


def wrappers(spec, version=None) -> dict:
    site = SITES.setdefault(spec.id, _site())
    site.attach(spec)
    _TOLD.clear()  # a new apply() (its own report) reports every row again
    return {name: functools.partial(wrapper, site) for name, wrapper in WRAPPERS.items()}
