"""LLaMA-Factory: keep vision tokens whole when a dataset processor cuts a sample to `cutoff_len`.

Which symbols and versions: `compat_matrix.yaml` (patch `llamafactory.truncation`). How it hands over:

* each processor's `_encode_data_example` runs unchanged (upstream's own label, `mask_history`,
  `efficient_eos`, `train_on_prompt` semantics) on a copy of the processor whose `cutoff_len` is
  unbounded, while the module's `infer_seqlen` records how upstream split the sample into turns;
* the full sample becomes one or more `core.Layout`s (turn ranges in upstream's budget order, the
  plugin's media runs) and `core.resolve` decides what to keep, using upstream's own `infer_seqlen`
  for the budget split, so a sample whose media are not cut comes out exactly as upstream's;
* `preprocess_dataset` is wrapped to know the batch (sample index) and to take dropped samples out;
* `loader._get_preprocessed_dataset` is wrapped to open a report run (report path, dataset names,
  a `_vlpatch_index` column so rows name the sample) and to log one summary after every worker.

Media spans are learned from each plugin's own output (see `learn`); the matrix's `options.coverage`
says which plugins and media kinds the tests prove.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import inspect
import io
import itertools
import operator
import os
import re
import shutil
import sys
from _thread import get_ident
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from .. import __version__, core, engine, report
from ..errors import unreadable_media
from . import _media, lf_header

IGNORE_INDEX = -100
UNBOUNDED = core.UNBOUNDED
INDEX_COLUMN = "_vlpatch_index"
SOURCE_COLUMN = "_vlpatch_source"  # the dataset (its name in dataset_info.json) a merged row came from
ROW_COLUMN = "_vlpatch_row"  # and its row there, as the user's file numbers it (0-based)
TRAINER = "llamafactory"

_traces: list = []  # stack of _Trace, one per encode call in progress
_batches: list = []  # stack of _Batch


@dataclass
class _Batch:
    examples: dict
    overlong_drop: bool  # packed processors drop a sample that is longer than cutoff_len themselves
    cursor: int = 0
    calls: int = 0
    drop_rows: list = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    clones: dict = field(default_factory=dict)
    rows: list = field(default_factory=list)  # report rows, written once per batch


# --------------------------------------------------------------------------- stage handlers
# Each handler knows one processor's output shape: how long its sequences are, how they split into
# layouts, how to rebuild the output from kept positions, and what a dropped sample returns.


class _Handler:
    def lengths(self, full) -> list:
        raise NotImplementedError

    def sequences(self, full) -> list:
        """The token ids of each sequence, in the order of `layouts`."""
        raise NotImplementedError

    def layouts(self, instance, full, splits, spans, budget, split, empty=None) -> list:
        """The sample's `core.Layout`s; `empty`: each turn's source encoded with its content left out
        (`_empty_sources`), for the chat frame a cut keeps (None: no frame known)."""
        raise NotImplementedError

    def build(self, full, kept) -> Any:
        raise NotImplementedError

    def answers(self, full, kept, out) -> dict:
        """Report fields: the answer tokens (supervised labels) before and after the cut (`out`: `build`'s),
        where the handler's output has one label sequence (else none)."""
        return {}

    def dropped(self, instance, overlong: bool) -> Any:
        raise NotImplementedError


_pick = core.take  # `seq` at the positions `kept`


class _Supervised(_Handler):
    """(input_ids, labels); one infer_seqlen call per turn, in upstream's order."""

    def lengths(self, full):
        return [len(full[0])]

    def sequences(self, full):
        return [full[0]]

    def layouts(self, instance, full, splits, spans, budget, split, empty=None):
        ids = full[0]
        eos = 1 if instance.template.efficient_eos else 0
        prefix = len(ids) - sum(map(sum, splits)) - eos
        reverse = bool(instance.data_args.mask_history)
        natural = list(reversed(splits)) if reverse else list(splits)
        pos = 0 if reverse else prefix
        ranges, heads = [], []
        for i, (s, t) in enumerate(natural):
            ranges.append((range(pos, pos + s), range(pos + s, pos + s + t)))
            heads.append(core.frame_of(ids[pos : pos + min(s, len(empty[i]))], empty[i]) if empty and i < len(empty) else 0)
            pos += s + t
        if reverse:
            ranges.reverse()
            heads.reverse()
        return [core.Layout(len(ids), spans(0, ids), ranges, budget, split, reserved=prefix + eos, heads=heads)]

    def build(self, full, kept):
        return _pick(full[0], kept[0]), _pick(full[1], kept[0])

    def answers(self, full, kept, out):
        labels, ignore = full[1], _ignore_index()
        return {"answer_tokens_before": len(labels) - labels.count(ignore),
                "answer_tokens_after": len(kept[0]) - out[1].count(ignore)}

    def dropped(self, instance, overlong):
        if overlong:
            n = instance.data_args.cutoff_len + 1
            return [instance.tokenizer.pad_token_id or 0] * n, [IGNORE_INDEX] * n
        return [], []


def _ignore_index() -> int:
    """IGNORE_INDEX as LLaMA-Factory's constants module holds it: the very object its labels hold, which
    `list.count` matches by identity (three times quicker than an equal int)."""
    value = getattr(sys.modules.get("llamafactory.extras.constants"), "IGNORE_INDEX", IGNORE_INDEX)
    return value if value == IGNORE_INDEX else IGNORE_INDEX


class _TwoSequences(_Handler):
    """(ids, labels, other_ids, other_labels, *rest): two sequences encoded from one sample and its media."""

    rest_when_dropped: tuple = ()

    def lengths(self, full):
        return [len(full[0]), len(full[2])]

    def sequences(self, full):
        return [full[0], full[2]]

    def build(self, full, kept):
        pairs = (_pick(full[0], kept[0]), _pick(full[1], kept[0]), _pick(full[2], kept[1]), _pick(full[3], kept[1]))
        return (*pairs, *full[4:])

    def dropped(self, instance, overlong):
        return ([], [], [], [], *self.rest_when_dropped)


class _Pairwise(_TwoSequences):
    """(chosen_ids, chosen_labels, rejected_ids, rejected_labels): a shared prompt, two responses."""

    def layouts(self, instance, full, splits, spans, budget, split, empty=None):
        prompt = splits[0][0]
        out = []
        other_len = {0: len(full[2]) - prompt, 2: len(full[0]) - prompt}
        for n, k in enumerate((0, 2)):  # chosen, rejected: one process_messages call each
            ids = full[k]

            def pair_split(s, t, c, _other=other_len[k]):  # upstream splits with the longer response
                return split(s, max(t, _other), c)

            runs = spans(n, ids)
            out.append(core.Layout(len(ids), runs, [(range(0, prompt), range(prompt, len(ids)))], budget, pair_split,
                                   heads=[core.frame_of(ids[:prompt], empty[0]) if empty else 0]))
        return out


class _Feedback(_TwoSequences):
    """(ids, labels, kl_ids, kl_labels, kto_tag): the sample and its KL pair, with the same media."""

    rest_when_dropped = (True,)

    def layouts(self, instance, full, splits, spans, budget, split, empty=None):
        out = []
        for n, ((s, t), ids) in enumerate(zip(splits, (full[0], full[2]))):  # the sample, its KL pair
            runs = spans(n, ids)
            out.append(core.Layout(len(ids), runs, [(range(0, s), range(s, s + t))], budget, split,
                                   heads=[core.frame_of(ids[:s], empty[0]) if empty else 0]))
        return out


class _Unsupervised(_Handler):
    """(input_ids, labels) that are not aligned: the prompt, and the response to predict."""

    def lengths(self, full):
        return [len(full[0]) + len(full[1])]

    def sequences(self, full):
        return [list(full[0]) + list(full[1])]

    def layouts(self, instance, full, splits, spans, budget, split, empty=None):
        ids = list(full[0]) + list(full[1])
        n = len(full[0])
        heads = [core.frame_of(ids[:n], empty[0]) if empty else 0]
        return [core.Layout(len(ids), spans(0, ids), [(range(0, n), range(n, len(ids)))], budget, split, heads=heads)]

    def build(self, full, kept):
        n = len(full[0])
        ids = list(full[0]) + list(full[1])
        return [ids[p] for p in kept[0] if p < n], [ids[p] for p in kept[0] if p >= n]

    def dropped(self, instance, overlong):
        return [], []


HANDLERS = {
    "supervised": _Supervised(),
    "pairwise": _Pairwise(),
    "feedback": _Feedback(),
    "unsupervised": _Unsupervised(),
}


# --------------------------------------------------------------------------- media spans, learned
# One mechanism for every mm_plugin: the plugin's own `process_messages` output says what it wrote for
# each media item. Over-budget samples with media run it once more with each placeholder between two
# private-use markers; the marked output, markers taken out, must equal the real output (else the
# plugin reacts to its surroundings and the sample is refused), and what lies between a placeholder's
# markers is exactly that item's expansion. `core.locate` finds each expansion in the token ids. The
# marked run reads no media again: within one encode, the plugin's `_get_mm_inputs` (where a plugin
# reads and processes its media) answers a call with the same media objects from what the real run
# computed (`_memoized`).

_OPEN, _MID, _SHUT, _END = "\ue000", "\ue001", "\ue002", "\ue003"
_MARKED = re.compile(f"{_OPEN}(\\d+){_MID}(.*?){_SHUT}\\1{_END}", re.S)


@dataclass
class _Trace:
    """What one encode call did: upstream's budget splits, and each process_messages /
    process_token_ids call on the plugin (arguments and result)."""

    splits: list = field(default_factory=list)
    calls: list = field(default_factory=list)  # (args, kwargs, messages out)
    prefixes: list = field(default_factory=list)  # (ids in, ids out)
    media: dict = field(default_factory=dict)  # _memoized's: the plugin's processed media, by its arguments
    encodes: list = field(default_factory=list)  # tracing() in sharing(): (arguments, output) of the encode
    learned: list | None = None  # media_runs': the learned spans


class Unreadable(Exception):
    """The plugin's layout for this sample could not be learned: it is refused, never cut blindly."""


def _arg_key(value):
    """A `_get_mm_inputs` argument as the memo knows it: by identity (the memo keeps it alive), an empty
    list or tuple by its type (plugins write `[]` for the kinds a call does not process)."""
    if isinstance(value, (list, tuple)) and not value:
        return ("empty", type(value).__name__)
    return id(value)


def _memo_call(method, memo: dict, *args, **kwargs):
    key = (tuple(_arg_key(a) for a in args), tuple((k, _arg_key(v)) for k, v in sorted(kwargs.items())))
    hit = memo.get(key)
    if hit is not None:
        return copy.copy(hit[1])
    out = method(*args, **kwargs)
    memo[key] = ((args, kwargs), copy.copy(out))
    return out


def _memoized(plugin, memo: dict):
    """A shallow copy of `plugin` (its class, a copy of its attributes) whose `_get_mm_inputs` answers a
    call with the same media objects from `memo`, where this encode processed them before (a shallow
    copy: a plugin may pop from what it gets), else runs the plugin's own and remembers it. Every method
    the copy runs (`process_messages`, Qwen-VL's `_get_mm_token_metadata`) reaches the memo through
    `self`; the plugin's own `_get_mm_inputs` runs on the plugin. No plugin of a tested release writes
    to itself while it processes messages. A plugin without `_get_mm_inputs` is returned as it is.
    The copy is made once per plugin (and thread); each call gives it the plugin's attributes afresh, as
    a new shallow copy has them (where copying an object of its class is copying its `__dict__`), and
    this call's memo."""
    method = getattr(plugin, "_get_mm_inputs", None)
    if method is None or not hasattr(plugin, "__dict__"):
        return plugin
    key = (id(plugin), get_ident())
    hit = _twins.get(key)
    if hit is not None and hit[0] is plugin and _copies_dict(type(plugin)):
        twin = hit[1]
        state = twin.__dict__
        state.clear()
        state.update(plugin.__dict__)
    else:
        if len(_twins) >= 64:
            _twins.clear()
        twin = copy.copy(plugin)
        _twins[key] = (plugin, twin)
    twin._get_mm_inputs = functools.partial(_memo_call, method, memo)
    return twin


_twins: dict = {}  # (plugin id, thread) -> (plugin, its memoizing copy)
_plain_copies: dict = {}


def _copies_dict(cls) -> bool:
    """Whether `copy.copy` of a `cls` object is a new object with a copy of its `__dict__` (dataclasses,
    plain classes: no `__copy__`, `__reduce__`, `__getstate__`, `__setstate__` or slots of its own)."""
    hit = _plain_copies.get(cls)
    if hit is None:
        own = [getattr(cls, name, None) is not getattr(object, name, None)
               for name in ("__copy__", "__reduce__", "__reduce_ex__", "__getstate__", "__setstate__")]
        hit = _plain_copies[cls] = not any(own) and not any("__slots__" in vars(k) for k in cls.__mro__)
    return hit


def _recorder(plugin):
    import wrapt

    class Recorder(wrapt.ObjectProxy):
        def process_messages(self, *args, **kwargs):
            if not _traces:
                return self.__wrapped__.process_messages(*args, **kwargs)
            trace = _traces[-1]
            out = _memoized(self.__wrapped__, trace.media).process_messages(*args, **kwargs)
            trace.calls.append((args, kwargs, out))
            return out

        def process_token_ids(self, *args, **kwargs):
            ids = args[0] if args else kwargs.get("input_ids")
            before = list(ids) if ids is not None else None
            out = self.__wrapped__.process_token_ids(*args, **kwargs)
            if _traces:
                _traces[-1].prefixes.append((before, list(out[0]) if out and out[0] is not None else None))
            return out

    return Recorder(plugin)


def _scan(messages, placeholders: dict) -> tuple:
    """([(message number, the text between its placeholders, its placeholders)] of each message whose
    content is text, in order (one regex split each); [(kind, index, message number)] of every
    placeholder, in text order)."""
    pattern, kind_of, split = _placeholder_pattern(placeholders)
    scanned, order, seen = [], [], dict.fromkeys(placeholders, 0)
    for m, msg in enumerate(messages):
        content = msg.get("content") if isinstance(msg, dict) else None
        if not isinstance(content, str):
            continue
        parts = split.split(content)
        if len(parts) == 1:  # no placeholder
            scanned.append((m, parts, []))
            continue
        found = parts[1::2]
        scanned.append((m, parts[0::2], found))
        for kind in map(kind_of.__getitem__, found):
            order.append((kind, seen[kind], m))
            seen[kind] += 1
    return scanned, order


def _placeholder_pattern(placeholders: dict) -> tuple:
    """(a regex of the placeholders, {placeholder: kind}, the regex as one group: `split` keeps what it
    matched); where one placeholder starts another, at one place the kind first by name wins."""
    key = tuple(sorted(placeholders.items()))
    hit = _patterns.get(key)
    if hit is None:
        kinds = {ph: kind for kind, ph in reversed(key)}
        alternatives = "|".join(re.escape(ph) for _, ph in key)
        hit = _patterns[key] = (re.compile(alternatives), kinds, re.compile(f"({alternatives})"))
    return hit


_patterns: dict = {}


def _mark(messages, placeholders: dict):
    """Messages with every placeholder between markers (numbered as `_order` lists them)."""
    pattern = _placeholder_pattern(placeholders)[0]
    counter = itertools.count()
    out = []
    for msg in messages:
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, str):

            def marked(match):
                n = next(counter)
                return f"{_OPEN}{n}{_MID}{match.group(0)}{_SHUT}{n}{_END}"

            msg = {**msg, "content": pattern.sub(marked, content)}
        out.append(msg)
    return out


def _unmark(messages, n: int):
    """(the expansion between each marker pair, or None where a pair is missing; messages unmarked)."""
    texts: list = [None] * n
    out = []
    for msg in messages:
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, str):

            def take(match):
                k = int(match.group(1))
                if k < n:
                    texts[k] = match.group(2)
                return match.group(2)

            content = _MARKED.sub(take, content)
            msg = {**msg, "content": content}
        out.append(msg)
    return texts, out


def _cached(cache: dict, key, owners: tuple, make, limit: int = 4096):
    """`make()`, remembered in `cache` under `key` while `owners` (the objects the key names by id: a
    tokenizer, a template) are the same objects; at `limit` entries the cache starts afresh. (An entry
    keeps its owners alive, so the same ids are the same objects.)"""
    hit = cache.get(key)
    ids = tuple(map(id, owners))
    if hit is None or hit[0] != ids:
        if len(cache) >= limit:
            cache.clear()
        hit = cache[key] = (ids, owners, make())
    return hit[2]


_atomic: dict = {}


def _atomic_ids(tokenizer) -> frozenset:
    """Ids that tokenize the same wherever they stand: special and added tokens."""

    def make():
        ids = set(getattr(tokenizer, "all_special_ids", []) or [])
        ids.update(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        return frozenset(ids)

    return _cached(_atomic, id(tokenizer), (tokenizer,), make)


@dataclass
class _Learned:
    """Per process_messages call: the expansions in text order; the items written into the token prefix.
    `read`: where the expansions were assumed (`_assumed`), the call's reading by its text, which `runs`
    takes instead when the token ids do not bear the assumption out."""

    expansions: tuple
    prefix: int  # tokens process_token_ids put before the text
    prefix_keys: tuple
    marks: frozenset  # the marked tokens of every expansion: what the model counts
    read: Callable | None = None

    def runs(self, ids) -> list:
        if not isinstance(ids, list):
            ids = list(ids)
        if self.read is not None:
            read, self.read = self.read, None
            try:
                return self._runs(ids)
            except (ValueError, Unreadable):
                full = read()
                self.expansions, self.prefix_keys, self.marks = full.expansions, full.prefix_keys, full.marks
        return self._runs(ids)

    def _runs(self, ids: list) -> list:
        runs = core.locate(ids, self.expansions, start=self.prefix)
        # the marks inside the runs: each lies in its expansion's core (marks are atomic tokens, which is what
        # a core is cut by), so the runs hold `core_count` of them and only the sequence's are counted, where
        # the text between the runs holds any (else none is stray)
        if core.marks_outside(ids, runs, self.marks, skip=self.prefix):
            stray = core.stray_marks(ids, (), self.marks, skip=self.prefix) - sum(e.core_count(self.marks) for e in self.expansions)
            if stray:
                raise Unreadable(f"{stray} media token(s) lie outside the spans the plugin wrote")
        if self.prefix and self.prefix_keys:
            kind, k = self.prefix_keys[0]
            runs.insert(0, core.Run(kind, 0, self.prefix, k, 1, self.prefix_keys if len(self.prefix_keys) > 1 else ()))
        return runs


def learn(instance, trace: _Trace) -> list:
    """The expansions of each recorded process_messages call (see the block comment above)."""
    plugin, tokenizer = instance.template.mm_plugin, instance.tokenizer
    name = type(plugin).__name__
    atomic = _atomic_ids(tokenizer)
    placeholders = _placeholders()
    func = type(plugin).process_messages
    first = next(iter(_signature(func).parameters))
    prefix = 0
    for before, after in trace.prefixes:
        if before is None or after is None or after[len(after) - len(before):] != before:
            raise Unreadable(f"{name}.process_token_ids changed the tokens in a way vlpatch cannot read")
        prefix = max(prefix, len(after) - len(before)) if before is not None else prefix
    out = []
    for args, kwargs, result in trace.calls:
        bound = _arguments(func, (plugin, *args), kwargs)
        bound.pop(first)
        assumed = _assumed(plugin, tokenizer, atomic, name, bound["messages"], placeholders, prefix)
        if assumed is not None:
            assumed.read = functools.partial(_read, plugin, tokenizer, atomic, name, bound, result, placeholders, prefix, trace)
            out.append(assumed)
            continue
        out.append(_read(plugin, tokenizer, atomic, name, bound, result, placeholders, prefix, trace))
    return out


def _read(plugin, tokenizer, atomic, name: str, bound: dict, result, placeholders: dict, prefix: int, trace) -> _Learned:
    """One process_messages call's expansions read off its output (`_predicted`), else off a marked run."""
    scanned, order = _scan(bound["messages"], placeholders)
    if not order:
        return _Learned([], prefix, (), frozenset())
    texts = _predicted(plugin, bound["messages"], scanned, order, result, placeholders)
    predicted = texts is not None
    if texts is None:
        marked = _mark(bound["messages"], placeholders)
        try:
            got = _memoized(plugin, trace.media).process_messages(**{**bound, "messages": marked})
        except Exception as exc:
            raise Unreadable(f"{name}.process_messages failed on the marked placeholders: {type(exc).__name__}: {exc}") from exc
        texts, unmarked = _unmark(got, len(order))
        if unmarked != list(result):
            raise Unreadable(f"{name}.process_messages writes differently when its placeholders are marked")
        _remember(plugin, order, texts)
    exps, prefix_keys, marks, joins = _expansions_of(tokenizer, atomic, name, order, texts)
    # what the model counts: every special token the plugin put into the text, wherever it put it (where
    # the output is the input with each placeholder replaced by its expansion, those are the expansions'
    # own, unless an expansion's edge could join the text beside it into another special token)
    if not predicted or joins or ("" in texts and _may_join(tokenizer, atomic, "")):
        marks = marks | _introduced(tokenizer, atomic, bound["messages"], result)
    kind = order[0][0]
    if predicted and not joins and texts[0] and texts.count(texts[0]) == len(texts) and all(k == kind for k, _, _ in order):
        _alike[id(plugin)] = (plugin, kind, texts[0])  # one kind, one text: the next call may be assumed alike
    else:
        _alike.pop(id(plugin), None)
    return _Learned(exps, prefix, prefix_keys, marks)


_alike: dict = {}  # plugin id -> (plugin, kind, text): the last call read wrote each item, all of that kind, as that text


def _assumed(plugin, tokenizer, atomic, name: str, messages, placeholders: dict, prefix: int) -> _Learned | None:
    """A call's expansions assumed without reading its output, where the last call read (`_read`) wrote
    every item as one text (not an empty one: PaliGemma's items go into the token prefix) and this call's
    placeholders are all of that kind (Gemma 3's and LLaVA's fixed run; Qwen-VL's while images keep one
    size): each item that text, in order. The token ids bear it out or not: `_Learned.runs` finds each
    item's marked core, whole, in order, and no mark outside them (a plugin that wrote any item otherwise,
    with more or fewer media tokens, fails one of these), else reads the call by its text. None where no
    such text is known."""
    hit = _alike.get(id(plugin))
    if hit is None or hit[0] is not plugin:
        return None
    text = _joined(messages)
    if text is None:
        return None
    counts = [(kind, text.count(ph)) for kind, ph in placeholders.items()]
    present = [(kind, n) for kind, n in counts if n]
    if len(present) != 1:
        return None
    kind, n = present[0]
    if kind != hit[1]:
        return None
    exps, prefix_keys, marks, _ = _expansions_of(tokenizer, atomic, name, [(kind, k, None) for k in range(n)], [hit[2]] * n)
    return _Learned(exps, prefix, prefix_keys, marks)


_kind_of = operator.itemgetter(0)


def _expansions_of(tokenizer, atomic, name: str, order: list, texts: list) -> tuple:
    """`_expansions`, remembered per tokenizer, kinds and texts where no text is empty (samples repeat them:
    Gemma 3's one text per image, Qwen-VL's one per image size): each item's keys are then its kind and its
    number in text order."""
    if None in texts or "" in texts:
        return _expansions(tokenizer, atomic, name, order, texts)
    return _cached(_expanded, (id(tokenizer), tuple(map(_kind_of, order)), tuple(texts)), (tokenizer, atomic),
                   lambda: _expansions(tokenizer, atomic, name, order, texts))


_expanded: dict = {}


def _expansions(tokenizer, atomic, name: str, order: list, texts: list) -> tuple:
    """(the `core.Expansion` of each item's text, in order; the items written into the prefix; the
    atomic tokens of the expansions; whether any expansion's edge may join the text beside it into a
    special token, `_may_join`). An empty text is written elsewhere: inside the item just before it
    (Qwen2.5-Omni audio in video) or the prefix."""
    tokens_of, keys_of, prefix_keys, marks = [], [], [], set()  # tokens_of: each expansion's _text_info
    last = None  # (message, index into tokens_of) of the last non-empty expansion
    infos: dict = {}  # {text: its _text_info} of this call (the items of one size write one text)
    for n, (kind, k, m) in enumerate(order):
        text = texts[n]
        if text is None:
            raise Unreadable(f"{name}.process_messages moved or dropped the placeholder of {kind} #{k}")
        if not text:
            if last is not None and last[0] == m:
                keys_of[last[1]].append((kind, k))
            else:
                prefix_keys.append((kind, k))
            continue
        info = infos.get(text)
        if info is None:
            info = infos[text] = _text_info(tokenizer, atomic, text)
            marks.update(info[1])
        tokens_of.append(info)
        keys_of.append([(kind, k)])
        last = (m, len(tokens_of) - 1)
    exps, joins = [], False
    for keys, (tokens, _, known, edge) in zip(keys_of, tokens_of):
        keys = tuple(keys)
        exp = known.get(keys)
        if exp is None:
            exp = known[keys] = core.Expansion(keys, tokens, atomic)
        exps.append(exp)
        joins = joins or edge
    return tuple(exps), tuple(prefix_keys), frozenset(marks), joins


_known: dict = {}  # plugin id -> (plugin, {kind: its items' expansion shape}), from marked runs


def _shape(plugin, kind: str, text: str) -> tuple | None:
    """(before, unit, after) where `text` is `before + unit * n + after` for the plugin's own token of
    `kind` (its `image_token`...), between markers that pin the run's ends: `before` and `after` not
    empty, `after` holding no unit and no start of one (Qwen-VL's `<|vision_start|>`, pads,
    `<|vision_end|>`: a run that grows with the image). Else (text, "", ""): this very text (Gemma 3's
    and LLaVA's fixed run). None for an empty text."""
    if not text:
        return None
    unit = getattr(plugin, f"{kind}_token", None)
    at = text.find(unit) if isinstance(unit, str) and unit else -1
    if at <= 0:
        return text, "", ""
    stop = _unit_run(unit).match(text, at).end()
    after = text[stop:]
    if not after or unit in after or unit.startswith(after):
        return text, "", ""
    return text[:at], unit, after


def _unit_run(unit: str):
    pattern = _runs.get(unit)
    if pattern is None:
        pattern = _runs[unit] = re.compile(f"(?:{re.escape(unit)})*")
    return pattern


_runs: dict = {}


def _remember(plugin, order, texts) -> None:
    """After a marked run: per kind, the shape its items' expansions had (`_shape`) where they all had
    one and the same; a kind whose items differ in shape (or write nothing: Qwen2.5-Omni's audio inside
    its video) is forgotten."""
    seen: dict = {}
    for (kind, _, _), text in zip(order, texts):
        seen.setdefault(kind, set()).add(_shape(plugin, kind, text))
    hit = _known.get(id(plugin))
    known = dict(hit[1]) if hit is not None and hit[0] is plugin else {}
    for kind, shapes in seen.items():
        shape = next(iter(shapes))
        if len(shapes) == 1 and shape is not None:
            known[kind] = shape
        else:
            known.pop(kind, None)
    _known[id(plugin)] = (plugin, known)


def _predicted(plugin, messages, scanned, order, result, placeholders) -> list | None:
    """The expansions of `order`'s items without a marked run, where the plugin's output (`result`) is
    exactly its input with every placeholder replaced by an expansion of its kind's remembered shape
    (`_remember`): the text between placeholders and the shape's fixed text pin each item's span as the
    markers would (a unit run is read whole: the text after it holds no unit). None otherwise: the
    marked run decides. `scanned`: the messages' `_scan`."""
    hit = _known.get(id(plugin))
    if hit is None or hit[0] is not plugin or len(messages) != len(result):
        return None
    known = hit[1]
    if not {kind for kind, _, _ in order} <= known.keys():
        return None
    if len(scanned) < len(messages) and not _untouched(messages, result, scanned):
        return None
    kind_of = _placeholder_pattern(placeholders)[1]
    texts: list = []
    for m, pieces, found in scanned:
        msg, out = messages[m], result[m]
        if not found:  # no placeholder: left as it was
            if not isinstance(out, dict) or msg != out:
                return None
            continue
        written = out.get("content") if isinstance(out, dict) else None
        if not isinstance(written, str) or {**msg, "content": written} != out:
            return None
        if not written.startswith(pieces[0]):
            return None
        pos = len(pieces[0])
        if found.count(found[0]) == len(found):  # one placeholder: every item as the first, in one compare
            first = _item_text(written, pos, known[kind_of[found[0]]], pieces[1])
            if first is not None and written == first.join(pieces):
                texts.extend([first] * len(found))
                continue
        for ph, piece in zip(found, pieces[1:]):
            text = _item_text(written, pos, known[kind_of[ph]], piece)
            if text is None:
                return None
            texts.append(text)
            pos += len(text) + len(piece)
        if pos != len(written):
            return None
    return texts if len(texts) == len(order) else None


def _untouched(messages, result, scanned) -> bool:
    """Whether every message without text content (not in `scanned`) came out of the plugin as it was."""
    text = {m for m, _, _ in scanned}
    return all(msg == out for m, (msg, out) in enumerate(zip(messages, result)) if m not in text)


def _item_text(written: str, pos: int, shape: tuple, piece: str) -> str | None:
    """The expansion of the item at `pos` of `written`, read by its kind's shape (`_remember`), where the
    input's text `piece` follows it; None where the output does not read so. A fixed run is the shape's
    own text (the same object each time: its lookups are quick)."""
    before, unit, after = shape
    if not written.startswith(before, pos):
        return None
    stop = _unit_run(unit).match(written, pos + len(before)).end() if unit else pos + len(before)
    if not (written.startswith(after, stop) and written.startswith(piece, stop + len(after))):
        return None
    return before if not unit and not after else written[pos : stop + len(after)]


_texts: dict = {}  # (tokenizer id, text) -> (tokenizer, ids): expansions repeat (one per image size and plugin)


def _tokens(tokenizer, text: str) -> tuple:
    """`text` tokenized on its own, remembered per tokenizer (at most 4,096 texts, then started afresh)."""
    return _cached(_texts, (id(tokenizer), text), (tokenizer,), lambda: tuple(tokenizer.encode(text, add_special_tokens=False)))


_infos: dict = {}  # (tokenizer id, text) -> ((tokenizer, atomic ids), (ids, the atomic ones, expansions by keys))


def _text_info(tokenizer, atomic: frozenset, text: str) -> tuple:
    """(`_tokens(tokenizer, text)`, the `atomic` ids among them, {keys: `core.Expansion(keys, ids, atomic)`}
    for `_expansions` to fill (the same expansion object each time, which keeps its core), `_may_join`'s
    answer), remembered as `_tokens` is."""

    def make():
        tokens = _tokens(tokenizer, text)
        return tokens, atomic.intersection(tokens), {}, _may_join(tokenizer, atomic, text)

    return _cached(_infos, (id(tokenizer), text), (tokenizer, atomic), make)


_atomic_text: dict = {}


def _atomic_pattern(tokenizer, atomic) -> tuple:
    """(a regex of the text of every atomic token, longest first; {text: id}): the tokenizer splits an
    added or special token out of any text it stands in, so finding its text is finding the token."""

    def make():
        texts = {}
        for i in sorted(atomic):
            text = tokenizer.convert_ids_to_tokens(i)
            if isinstance(text, str) and text:
                texts.setdefault(text, i)
        pattern = re.compile("|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True))) if texts else None
        return pattern, texts

    return _cached(_atomic_text, id(tokenizer), (tokenizer,), make)


def _introduced(tokenizer, atomic, before, after) -> set:
    """Special tokens in the plugin's output messages that its input did not hold."""
    pattern, ids = _atomic_pattern(tokenizer, atomic)
    if pattern is None:
        return set()

    def found(messages):
        text = "\n".join(m["content"] for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str))
        return {ids[t] for t in set(pattern.findall(text))}

    return found(after) - found(before)


_joins: dict = {}


def _may_join(tokenizer, atomic, text: str) -> bool:
    """Whether `text`, written between other text, could form a special token across one of its edges:
    some special token's text runs over its start or its end."""
    tokens = _atomic_pattern(tokenizer, atomic)[1]
    longest = max(map(len, tokens), default=0)
    if len(text) > 2 * longest:  # only its edges matter: remembered by them (a Qwen-VL run is long)
        text = text[:longest] + "\0" + text[-longest:]

    def make():
        for token in tokens:
            for i in range(1, len(token)):
                left, right = token[:i], token[i:]
                if text.startswith(right) or right.startswith(text) or text.endswith(left) or left.endswith(text):
                    return True
        return False

    return _cached(_joins, (id(tokenizer), text), (tokenizer,), make)


def _signature(func):
    sig = _signatures.get(func)
    if sig is None:
        sig = _signatures[func] = inspect.signature(func)
    return sig


def details(spec) -> dict:
    """For status(): the installed LLaMA-Factory's mm plugins. Every one is read the same way (its own
    process_messages output); the matrix's coverage table says which media kinds the tests prove."""
    try:
        from llamafactory.data.mm_plugin import PLUGINS  # already imported with the loader
    except Exception:  # pragma: no cover
        return {}
    table = spec.options.get("coverage", {})
    covered = []
    for name in sorted(PLUGINS):
        row = table.get(name)
        kinds = "+".join(row.get("kinds") or []) or "text" if row else "learned, not in the tested table"
        covered.append(f"{name} ({kinds})")
    return {"covered_plugins": covered, "uncovered_plugins": []}


# --------------------------------------------------------------------------- wrappers


def _sized_images(wrapped, instance, args, kwargs):
    """LLaMA-Factory reads images (its collator, from the dataset rows): a sized entry that policy
    `shrink` left in a row is read as its original downsized to the size the row was counted at."""
    images = args[0] if args else kwargs.get("images")
    if images and any(_media.unmark(x) is not None for x in images):
        if args:
            args = (_media.read_sized(images), *args[1:])
        else:
            kwargs = {**kwargs, "images": _media.read_sized(images)}
    return wrapped(*args, **kwargs)


def _record_split(wrapped, instance, args, kwargs):
    out = wrapped(*args, **kwargs)
    if _traces:
        _traces[-1].splits.append(out)
    return out


def _batch_wrapper(overlong_drop: bool):
    def wrapper(wrapped, instance, args, kwargs):
        examples = args[0] if args else kwargs["examples"]
        batch = _Batch(examples, overlong_drop)
        _batches.append(batch)
        try:
            out = wrapped(*args, **kwargs)
        finally:
            _batches.pop()
            report.write_rows(batch.rows)
        if batch.drop_rows:
            drop = set(batch.drop_rows)
            for key in list(out.keys()):
                out[key] = [v for i, v in enumerate(out[key]) if i not in drop]
        report.tally(batch.counts, batch.reasons)
        return out

    return wrapper


def _bind(func, instance, args, kwargs) -> dict:
    return _arguments(func, (instance, *args), kwargs)


_signatures: dict = {}
_plain: dict = {}  # func -> (its parameter names, those without a default) where all are plain


def _arguments(func, args: tuple, kwargs: dict) -> dict:
    """`inspect.signature(func).bind(*args, **kwargs).arguments` as a new dict; read off the parameter
    names where each is a plain positional-or-keyword one (every encode and process_messages of the
    tested releases), else bound by `inspect`."""
    plain = _plain.get(func)
    if plain is None:
        params = _signature(func).parameters.values()
        names = tuple(p.name for p in params)
        plain = _plain[func] = (
            (names, frozenset(p.name for p in params if p.default is p.empty), frozenset(names))
            if all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params) else ()
        )
    if plain and len(args) <= len(plain[0]):
        out = dict(zip(plain[0], args))
        out.update(kwargs)  # (in the call's order: no caller reads the order)
        if len(out) == len(args) + len(kwargs) and plain[1] <= out.keys() <= plain[2]:
            return out
    return dict(_signature(func).bind(*args, **kwargs).arguments)


def _identify(batch: _Batch | None, prompt) -> tuple:
    """(row index in the merged dataset, position in the batch, source dataset, row in it) of the sample
    being encoded; None where unknown."""
    if batch is None:
        return None, None, None, None
    examples = batch.examples
    prompts = examples.get("_prompt") or []
    for j in range(batch.cursor, len(prompts)):
        if prompts[j] is prompt:
            batch.cursor = j + 1
            index, source, row = examples.get(INDEX_COLUMN), examples.get(SOURCE_COLUMN), examples.get(ROW_COLUMN)
            return (None if index is None else index[j]), j, (None if source is None else source[j]), (None if row is None else row[j])
    return None, None, None, None


def _describe(index, position, source=None, row=None) -> str:
    """How an error names the sample: its dataset and row as the user's file has them, where known."""
    if source is not None and row is not None:
        return f"{source}[{row}]"
    run = report.current_run()
    where = run.meta.get("dataset", "?") if run else "?"
    if index is not None:
        return f"{where}[{index}]"
    return f"{where}[batch position {position}]" if position is not None else f"{where}[?]"


def _is_bad_input(exc: BaseException) -> bool:
    """An unreadable media file, or LLaMA-Factory's own placeholder / media count check."""
    return unreadable_media(exc) or (isinstance(exc, ValueError) and "does not match the number of" in str(exc))


def _placeholders() -> dict:
    """LLaMA-Factory's placeholder strings (its IMAGE_PLACEHOLDER etc. environment variables apply, as
    its constants module read them at import)."""
    constants = sys.modules.get("llamafactory.extras.constants")
    last = _placeholder_strings
    if last and last[0] is constants:  # the usual case: the module read last time
        return last[1]
    if constants is None:
        from llamafactory.extras import constants  # imported with the loader already
    strings = {kind: getattr(constants, f"{kind.upper()}_PLACEHOLDER", core.PLACEHOLDERS[kind]) for kind in core.MEDIA_KINDS}
    _placeholder_strings[:] = [constants, strings]  # shared: callers only read it
    return strings


_placeholder_strings: list = []  # [the constants module, its placeholders]
_DICT, _CONTENT = {dict}, operator.itemgetter("content")


def _joined(messages) -> str | None:
    """The messages' contents joined by NUL in one step, where every message is a plain dict with text
    content (the usual case); else None."""
    if set(map(type, messages)) <= _DICT:
        try:
            return "\0".join(map(_CONTENT, messages))
        except (KeyError, TypeError):
            pass
    return None


def _placeholder_mismatch(bound: dict, counts: dict) -> str:
    """'' when the prompt and the (first non-empty) response hold one placeholder per media item."""
    messages = list(bound.get("prompt") or [])
    for m in bound.get("response") or []:
        if isinstance(m, dict) and m.get("content"):
            messages.append(m)
            break
    text = _joined(messages)
    if text is None:
        text = "\0".join(m["content"] for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str))
    placeholders = _placeholders()
    if list(map(text.count, placeholders.values())) == list(map(counts.get, placeholders, itertools.repeat(0))):
        return ""  # (the usual case: every count in one step)
    wrong = []
    for kind, placeholder in placeholders.items():
        found = text.count(placeholder)
        if found != counts.get(kind, 0):
            wrong.append(f"{found} {placeholder} placeholder(s) but {counts.get(kind, 0)} {kind}(s)")
    return "; ".join(wrong)


def _media_first(messages):
    placeholders = list(_placeholders().values())
    out = []
    for msg in messages:
        if isinstance(msg, dict) and isinstance(msg.get("content"), str):
            msg = {**msg, "content": core.media_first(msg["content"], placeholders)}
        out.append(msg)
    return out


def _recording(instance):
    """A copy of a dataset processor whose plugin calls are recorded into the current trace (see learn)."""
    clone = copy.copy(instance)
    clone.template = copy.copy(instance.template)
    clone.template.mm_plugin = _recorder(instance.template.mm_plugin)
    return clone


def _unbounded(instance, batch: _Batch | None):
    clone = batch.clones.get(id(instance)) if batch else None
    if clone is None:
        clone = _recording(instance)
        clone.data_args = copy.copy(instance.data_args)
        clone.data_args.cutoff_len = UNBOUNDED
        if batch:
            batch.clones[id(instance)] = clone
    return clone


@contextlib.contextmanager
def tracing(instance):
    """For `vlpatch scan`: (a recording copy of the dataset processor, its trace); after the copy encoded
    a sample, `media_runs(instance, trace, ids)` gives the media spans of its first sequence. Within
    `sharing()`, the copy's encode (uncut: the scan's whole-sample pass) is kept with upstream's budget
    splits, for `share` to hand to the policy passes that follow."""
    trace = _Trace()
    _traces.append(trace)
    clone = _recording(instance)
    module = sys.modules[type(instance).__module__]
    split = getattr(module, "infer_seqlen", None)
    recorded = _shared and split is not None and not hasattr(split, "__wrapped__")  # else the patch records them
    if _shared:
        func = getattr(type(instance)._encode_data_example, "__wrapped__", type(instance)._encode_data_example)

        def encode(**kwargs):
            out = func(clone, **kwargs)
            trace.encodes.append((kwargs, out))
            return out

        clone._encode_data_example = encode
    if recorded:

        def recording_split(*args, **kwargs):
            return _record_split(split, None, args, kwargs)

        module.infer_seqlen = recording_split
    try:
        yield clone, trace
    finally:
        if recorded:
            module.infer_seqlen = split
        _traces.remove(trace)


def media_runs(instance, trace: _Trace, ids) -> tuple:
    """(runs, marks) of the first sequence a traced encode produced; raises Unreadable."""
    learned = trace.learned = learn(instance, trace)
    if not learned:
        return [], frozenset()
    return learned[0].runs(ids), learned[0].marks


def share(instance, trace: _Trace) -> None:
    """Within `sharing()`: the traced whole-sample encode (`tracing`, `media_runs`) becomes the uncut
    encode of the policy passes that encode the same sample next, as their own first one would be."""
    if not _shared or len(trace.encodes) != 1 or trace.learned is None:
        return
    bound, full = trace.encodes[0]
    key = _share_key(instance, bound)
    if key is not None:
        _shared[-1][key] = [full, trace, trace.learned]


def _encode_wrapper(stage: str):
    handler = HANDLERS[stage]

    def wrapper(wrapped, instance, args, kwargs):
        func = wrapped.__func__
        bound = _bind(func, instance, args, kwargs)
        bound.pop("self", None)
        batch = _batches[-1] if _batches else None
        if batch is not None:
            batch.calls += 1
        where = _identify(batch, bound.get("prompt"))  # by the batch's own prompt object: before media_first
        cfg = engine.config()
        if cfg.media_first and "prompt" in bound:
            bound["prompt"] = _media_first(bound["prompt"])
        return _Encode(stage, handler, func, instance, bound, batch, cfg, where).run()

    return wrapper


_MEDIA_ARGS = tuple((kind, kind + "s") for kind in core.MEDIA_KINDS)  # each kind's encode argument


class _Encode:
    """One sample through a patched `_encode_data_example`: upstream's encode uncut, its media spans,
    the layouts, the policy's decision, and the output with the report row."""

    def __init__(self, stage, handler, func, instance, bound, batch, cfg, where):
        self.handler, self.func, self.instance, self.bound, self.batch, self.cfg = handler, func, instance, bound, batch, cfg
        media = self.media = {kind: bound.get(arg) or [] for kind, arg in _MEDIA_ARGS}
        counts = dict(zip(core.MEDIA_KINDS, map(len, media.values())))
        self.has_media = any(counts.values())
        self.budget = instance.data_args.cutoff_len
        self.stage, self.where, self._sample, self._row = stage, where, None, None
        self.key = _share_key(instance, bound)
        self.counts = counts

    @property
    def row(self) -> dict:
        """The sample's report row so far (made where one is written: most samples fit)."""
        if self._row is None:
            index, position, source, source_row = self.where  # _identify's
            self._row = {"stage": self.stage, "index": index, "source_dataset": source, "source_row": source_row,
                         "batch_position": position, "budget": self.budget,
                         "media": {kind: n for kind, n in self.counts.items() if n} if self.has_media else {}}
        return self._row

    @property
    def sample(self) -> str:
        """How errors and the policy name the sample (built where one needs it: most samples fit)."""
        return self._name()

    def _name(self) -> str:
        if self._sample is None:
            self._sample = _describe(*self.where)
        return self._sample

    def reject(self, code, detail, exc=None):
        """The sample refused for `code` (bad input, uncovered media): dropped, or an error under `error`."""
        return _reject(self.handler, self.instance, self.batch, self.cfg, self.sample, self.row, core.because(code, detail), exc)

    def run(self):
        mismatch = _placeholder_mismatch(self.bound, self.counts)
        if mismatch:
            return self.reject("bad_input", mismatch)
        try:
            full, trace, shared = self.uncut()
        except _BadInput as bad:
            return self.reject("bad_input", str(bad.exc), bad.exc)
        lengths = self.handler.lengths(full)
        if max(lengths) <= self.budget:  # upstream would not cut anything: its output as is
            _count(self.batch, "kept")
            return full
        module = sys.modules[type(self.instance).__module__]
        self.split = getattr(module.infer_seqlen, "__wrapped__", module.infer_seqlen)
        try:
            self.empty = _empty_sources(self.instance, self.bound) if self.has_media else None  # a frame stays beside media
            layouts = self.layouts(full, trace, shared[2] if shared is not None else None, len(lengths))
            if shared is not None:
                shared[2] = self.learned
        except (Unreadable, ValueError) as exc:  # never cut what is not understood: refused, reported
            plugin = type(self.instance.template.mm_plugin).__name__
            return self.reject("uncovered_media", f"{plugin}: {exc}", exc)
        self.row.update(tokens_before=max(lengths), media_tokens=core.run_tokens(layouts[0].runs))
        return self.decide(full, layouts)

    def uncut(self) -> tuple:
        """(upstream's output with nothing cut, its trace, the `sharing` entry or None); raises _BadInput."""
        shared = _shared[-1].get(self.key) if self.key is not None else None
        if shared is not None:  # vlpatch scan's next policy pass over this sample: the same uncut encode
            return shared[0], shared[1], shared
        full, trace = self.encode(self.bound)
        if self.key is not None:
            shared = _shared[-1][self.key] = [full, trace, None]
        return full, trace, shared

    def encode(self, bound) -> tuple:
        """(upstream's output for `bound` with an unbounded cutoff_len, its trace); raises _BadInput."""
        trace = _Trace()
        _traces.append(trace)
        try:
            return self.func(_unbounded(self.instance, self.batch), **bound), trace
        except Exception as exc:
            if not _is_bad_input(exc):
                if hasattr(exc, "add_note"):
                    exc.add_note(f"vlpatch: while encoding sample {self.sample}")
                raise
            raise _BadInput(exc) from exc
        finally:
            _traces.pop()

    def layouts(self, full, trace, learned, sequences: int) -> list:
        """The sample's layouts from its learned media spans (`learned`, where known already)."""
        if learned is None:
            learned = learn(self.instance, trace) if self.has_media else []
        self.learned = learned
        if len(learned) < sequences and self.has_media:
            raise Unreadable(f"{len(learned)} process_messages call(s) for {sequences} sequence(s)")

        def spans(n, ids):
            return learned[n].runs(ids) if learned else []

        return self.handler.layouts(self.instance, full, trace.splits, spans, self.budget, self.split, self.empty)

    def decide(self, full, layouts):
        """The policy's decision on a sample upstream would cut, and its output (or a drop)."""
        policy = core.get_policy(self.cfg.policy, self.cfg.shrink_fallback)
        made: list = []

        def shrunk(new_media):  # the sample encoded again with other media, and its layouts
            try:
                again, trace = self.encode({**self.bound, **{k + "s": v for k, v in new_media.items() if k + "s" in self.bound}})
            except _BadInput as bad:
                raise bad.exc from None
            return again, self.layouts(again, trace, None, 0)

        def reencode(scale):  # the shrinker is made when the media do not fit (not for a cut of text alone)
            if not made:
                made.append(_Shrinker(self.instance, self.media, layouts, self.cfg, shrunk,
                                      lambda after: _splice(self.handler, full, layouts, after)))
            return made[0].reencode(scale)

        try:
            decision = core.resolve(layouts, policy, self._name, reencode if policy.reencodes else None)
            if decision.resized is not None:
                decision, full, layouts = made[0].commit(decision, self.sample)
        except core.SampleError:
            _emit(self.batch, {**self.row, "action": "error", "reason": "media_exceed_budget"})
            raise
        finally:
            if made:
                made[0].close()
        if decision.action == "dropped":
            return _reject(self.handler, self.instance, self.batch, self.cfg, self.sample, self.row,
                           {"code": decision.code, "reason": decision.reason}, decided=True)
        if decision.resized is not None:
            self.row["media_resized"] = made[0].resized_rows(decision.resized)
        return self.finish(full, layouts, decision)

    def finish(self, full, layouts, decision):
        """The kept output, the removed media out of the sample's lists, the report row and tallies."""
        if decision.removed:
            for kind, k in sorted(decision.removed, reverse=True):
                del self.media[kind][k]
        out = self.handler.build(full, decision.kept)
        after = max(map(len, decision.kept))
        kept_media = core.run_tokens(layouts[0].runs, decision.removed)
        _count(self.batch, decision.action, decision.code)
        _emit(self.batch, {
            **self.row,
            "action": decision.action,
            "reason": decision.reason or "text_over_budget",
            "tokens_after": after,
            "text_tokens_before": self.row["tokens_before"] - self.row["media_tokens"],
            "text_tokens_after": after - kept_media,
            "media_tokens_after": kept_media,
            "media_removed": _removed(decision.removed),
            **self.handler.answers(full, decision.kept, out),
        })
        return out


class _BadInput(Exception):
    """Upstream's encode failed on bad input (an unreadable media file, its own placeholder check)."""

    def __init__(self, exc: BaseException):
        super().__init__(str(exc))
        self.exc = exc


_shared: list = []  # vlpatch scan's (`sharing`): {sample key: [uncut output, its trace, learned spans]}


@contextlib.contextmanager
def sharing():
    """For `vlpatch scan`, whose policy passes encode the same over-long samples again and differ only
    in what they decide: within this block, a sample encoded again with the same inputs (media given as
    paths) reuses upstream's uncut encode, its trace and the learned spans of the first time."""
    _shared.append({})
    try:
        yield
    finally:
        _shared.pop()


def _share_key(instance, bound: dict):
    """The key of a sample's inputs for `sharing`, or None (not sharing, or media that are not paths)."""
    if not _shared:
        return None
    for kind in core.MEDIA_KINDS:
        if not all(isinstance(item, str) for item in bound.get(kind + "s") or []):
            return None
    return (type(instance).__qualname__, id(instance.template), id(instance.tokenizer), repr(sorted(bound.items())))


def _empty_sources(instance, bound) -> list | None:
    """Each turn's source, as the sample's own template encodes it with the content of every user,
    assistant and observation message left out: the chat frame of each turn (the template prefix, the
    system block, the role header) is what it shares with the real source (`core.frame_of`). The first
    response stands for a pair's (the frame lies in the prompt). None where it cannot be encoded: no
    frame is then kept beyond what the cut keeps anyway."""
    prompt = list(bound.get("prompt") or [])
    response = list(bound.get("response") or [])[:1] or [{"role": "assistant", "content": ""}]
    messages = prompt + response
    system, tools = bound.get("system"), bound.get("tools")

    def make():
        try:
            pairs = instance.template.encode_multiturn(instance.tokenizer, core.emptied(messages), system, tools)
        except Exception:  # noqa: BLE001 - a template that needs content: no frame known
            return None
        return [list(source) for source, _ in pairs]

    try:  # samples share frames: the same template, system prompt, tools and turns (remembered, as _tokens)
        key = (id(instance.template), id(instance.tokenizer), system, tools, tuple(map(_emptied_key, messages)))
        hash(key)
    except TypeError:
        return make()
    return _cached(_frames, key, (instance.template, instance.tokenizer), make)


def _emptied_key(message: dict) -> tuple:
    """(role, content) of `message` as `core.emptied` leaves it (a list for emptied parts: unhashable, as
    the emptied message's own)."""
    role = message.get("role")
    if (role or message.get("from")) in core.CONTENT_ROLES:
        return role, [] if isinstance(message.get("content"), (list, tuple)) else ""
    return role, message.get("content")


_frames: dict = {}  # _empty_sources's, by template, tokenizer, system, tools and emptied turns


def _splice(handler, full, before, after):
    """`full` (upstream's output for `before`) turned into the output for `after`, the same layouts with
    runs shortened (`core.relength`: Qwen-VL images at smaller sizes), by taking tokens out of each
    shortened run's interior, where the interior is one repeated token (the image pad) from every
    sequence aligned with it (ids, labels). None where a run grew or is not so made: then the caller
    encodes."""
    kept = []
    for ids, b, a in zip(handler.sequences(full), before, after):
        drop: set = set()
        for rb, ra in zip(b.runs, a.runs):
            cut = rb.length - ra.length
            if cut < 0:
                return None
            if cut:
                inner = ids[rb.start + 1 : rb.stop - 1]
                if len(inner) < cut or len(set(inner)) != 1:
                    return None
                drop.update(range(rb.start + 1, rb.start + 1 + cut))
        if len(ids) - len(drop) != a.length:
            return None
        kept.append([p for p in range(len(ids)) if p not in drop])
    return handler.build(full, kept)


class _Shrinker:
    """Policy `shrink` for one sample: `reencode(scale)` encodes it again through upstream's own code with
    stand-ins of the smaller sizes (blank images: token counts depend on an image's size only, and the
    header path counts them without pixels; blank video files with the candidate's size, frames and
    rate, as upstream reads videos from files); `commit` writes the chosen sizes as real downsized
    files (`_media`), encodes the sample once more with them, and puts them into the sample's media
    list. LLaMA-Factory's collator re-reads media from the dataset rows at training time (in every worker
    and rank, and after a cached `tokenized_path` is reloaded), so the rows must name the downsized
    files: then what it reads is what was counted here."""

    def __init__(self, instance, media, layouts, cfg, encode, splice):
        self.media, self.encode, self.splice, self.layouts = media, encode, splice, layouts
        self.scratch = None  # the search's stand-in videos
        self.videos = {}  # key -> _media.Video
        processor = getattr(instance, "processor", None)
        plugin = instance.template.mm_plugin
        self.fps = float(getattr(processor, "video_fps", 2.0) or 2.0)
        maxlen = int(getattr(processor, "video_maxlen", 128) or 128)
        pixels = {
            "image": ("image_max_pixels", "image_min_pixels"),
            "video": ("video_max_pixels", "video_min_pixels"),
        }
        self.items = {}
        for kind, k in core.first_turn_keys(layouts):
            if kind not in pixels or k >= len(media[kind]):
                continue
            video, count = None, 0
            if kind == "image":
                size = _media.image_size(media["image"][k])
            elif isinstance(media["video"][k], (list, tuple)):  # frames given as images: upstream takes them all
                sizes = {_media.image_size(frame) for frame in media["video"][k]}
                size, count = (sizes.pop() if len(sizes) == 1 else None), len(media["video"][k])
            else:
                video = _media.probe_video(
                    media["video"][k], lambda st: plugin._get_video_sample_indices(st, video_fps=self.fps, video_maxlen=maxlen), self.fps
                )
                size, count = (video and (video.width, video.height)), (video.frames if video else 0)
            if size is None:  # not something this can downsize (frames of different sizes, an unreadable file): stays
                continue
            cap, low = (getattr(processor, name, None) for name in pixels[kind])
            w, h = size
            if cap and w * h > cap:
                f = (cap / (w * h)) ** 0.5
                w, h = int(w * f), int(h * f)
            self.items[(kind, k)] = core.ShrinkItem(
                (w, h), size, max(int(cfg.shrink_min_pixels), int(low or 0)), count, min(count, int(cfg.shrink_min_frames))
            )
            if video:
                self.videos[(kind, k)] = video
        self.processor = processor
        self.base = self._base(plugin)

    def _base(self, plugin):
        """{image key: its vision tokens now, from the header arithmetic} where that arithmetic covers
        the plugin and agrees with the encoded run (the run is those tokens and at most its two
        boundary tokens), else None: the search encodes every candidate."""
        options = lf_header.patch_options()
        keys = [key for key in self.items if key[0] == "image"]
        if not keys or type(plugin).__name__ not in options.get("plugins", ()):
            return None
        found = lf_header.size_tokens([self.items[key].file for key in keys], self.processor)
        if found is None:
            return None
        runs = {k: r.length for r in self.layouts[0].runs for k in r.keys()}
        if any(not 0 <= runs.get(key, -1) - n <= 2 for key, n in zip(keys, found)):
            return None
        return dict(zip(keys, found))

    def reencode(self, scale: float):
        if not self.items:
            raise core.ShrinkUnavailable("nothing that must stay can be downsized here (audio, frames of different sizes, an unreadable video)")
        changed, floor, sharp = core.shrink_candidates(self.items, scale)
        if not changed:  # every item is at or below the floor already
            return core.Resized(scale, self.layouts, [], True)
        return core.first_fitting(self._predict(scale, sizes, floor) or self._try(scale, sizes, floor) for sizes in (sharp, changed) if sizes)

    def _predict(self, scale, changed, floor):
        """The re-encode's layouts from the header arithmetic, without encoding (images of the Qwen-VL
        plugins only: there an image's size changes its run's length and nothing else), or None. The
        commit encodes the chosen sizes for real; the collator's features are tested against them."""
        if self.base is None or any(key not in self.base for key, _b, _a in changed):
            return None
        found = lf_header.size_tokens([a for _k, _b, a in changed], self.processor)
        if found is None:
            return None
        deltas = {key: n - self.base[key] for (key, _b, _a), n in zip(changed, found)}
        layouts = [core.relength(layout, deltas) for layout in self.layouts]
        return None if None in layouts else core.Resized(scale, layouts, changed, floor)

    def _try(self, scale, changed, floor):
        from PIL import Image

        new = {kind: list(items) for kind, items in self.media.items()}
        for (kind, k), _before, after in changed:
            if kind == "image":
                new[kind][k] = Image.new("RGB", after)
            elif (kind, k) not in self.videos:  # a frame list: as many blank frames of the new size, as PNG
                blank = io.BytesIO()  # bytes (LLaMA-Factory 0.9.3 takes no in-memory images in a frame list)
                Image.new("RGB", after[:2]).save(blank, format="PNG", compress_level=1)
                new[kind][k] = [{"bytes": blank.getvalue(), "path": None}] * after[2]
            else:
                self.scratch = self.scratch or _media.scratch()
                new[kind][k] = _media.blank_video(self.videos[(kind, k)], after[:2], after[2], self.fps, self.scratch)
        full, layouts = self.encode(new)
        return core.Resized(scale, layouts, changed, floor, full)

    def commit(self, decision, sample):
        """(decision, full, layouts) with the real downsized files in the sample's media list."""
        folder = _shrink_dir()
        new = {kind: list(items) for kind, items in self.media.items()}
        for (kind, k), _before, after in decision.resized.sizes:
            if kind == "image":  # a path: the row names it at the new size (read so by `_sized_images`)
                new[kind][k] = _media.sized(new[kind][k], after) or _media.write_image(new[kind][k], after, folder)
            elif (kind, k) not in self.videos:  # a frame list: the kept frames, each downsized (PNG)
                frames = new[kind][k]
                new[kind][k] = [_media.write_image(frames[i], after[:2], folder) for i in core.pick_frames(len(frames), after[2])]
            else:
                new[kind][k] = _media.write_video(self.videos[(kind, k)], after[:2], after[2], self.fps, folder)
        # predicted sizes of images the rows name by path: the sample's ids with the runs shortened (an
        # encode at the new sizes gives the same, `test_the_arithmetic_search_decides_as_the_encoding_search`)
        spliced = None
        if decision.resized.payload is None and all(kind == "image" and _media.unmark(new[kind][k]) for (kind, k), _b, _a in decision.resized.sizes):
            spliced = self.splice(decision.resized.layouts)
        full, layouts = (spliced, decision.resized.layouts) if spliced is not None else self.encode(new)
        plans = core.fits(layouts)
        want = [r.length for r in decision.resized.layouts[0].runs]
        if plans is None or [r.length for r in layouts[0].runs] != want:
            raise core.SampleError(sample, "shrink: the downsized files encode differently from their sizes", str(decision.resized.sizes))
        for kind, items in new.items():  # the rows name the downsized media: the collator reads those
            self.media[kind][:] = items
        decision.kept = [p.kept for p in plans]
        decision.removed = sorted(plans[0].left)
        self.final = layouts
        return decision, full, layouts

    def close(self) -> None:
        _media.remove(self.scratch)
        self.scratch = None

    def resized_rows(self, resized) -> list:
        rows = []
        for (kind, k), b, a in resized.sizes:
            row = report.resized_row((kind, k), b, a, self.layouts[0].runs, self.final[0].runs)
            entry = self.media[kind][k]
            named = entry if isinstance(entry, str) else entry.get("path") if isinstance(entry, dict) else None
            if named is not None:  # a sized entry (nothing written), or the downsized file written
                row["sized_entry" if _media.unmark(named) else "file"] = named
            rows.append(row)
        return rows


def _shrink_dir() -> str:
    run = report.current_run()
    where = (run.meta.get("shrink_dir") if run else None) or engine.config().shrink_dir
    if not where:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        where = os.path.join(base, "vlpatch", "media")
    return where


def _removed(keys) -> dict:
    out: dict = {}
    for kind, k in keys:
        out.setdefault(kind, []).append(k)
    return out


def _emit(batch: _Batch | None, row: dict) -> None:
    if batch is None:
        report.write_row(row)
    else:
        batch.rows.append(row)


def _count(batch: _Batch | None, action: str, reason: str | None = None) -> None:
    if batch is None:
        report.tally(Counter({action: 1}), Counter({reason: 1} if reason else {}))
        return
    batch.counts[action] += 1
    if reason:
        batch.reasons[reason] += 1


def _reject(handler, instance, batch, cfg, sample, row, why: dict, exc=None, decided=False):
    """Drop the sample (reported), or raise naming it under policy `error`. `why`: `core.because`'s."""
    if not decided and core.get_policy(cfg.policy).stops:
        _emit(batch, {**row, "action": "error", "reason": why["reason"]})
        raise core.SampleError(sample, why["reason"]) from exc
    _emit(batch, {**row, "action": "dropped", "reason": why["reason"]})
    _count(batch, "dropped", why["code"])
    if batch is not None and not batch.overlong_drop:
        batch.drop_rows.append(batch.calls - 1)
    return handler.dropped(instance, batch is not None and batch.overlong_drop)


_loading: list = []  # stack of [dataset names still to come] while _get_merged_dataset loads them


def _merged_wrapper(wrapped, instance, args, kwargs):
    """loader._get_merged_dataset: tells `_source_wrapper` the name of each dataset it loads, in order."""
    bound = _signature(wrapped).bind(*args, **kwargs)
    names = bound.arguments.get("dataset_names")
    _loading.append(list(names) if isinstance(names, (list, tuple)) else [])
    try:
        return wrapped(*args, **kwargs)
    finally:
        _loading.pop()


def _source_wrapper(wrapped, instance, args, kwargs):
    """loader.align_dataset (one dataset, after LLaMA-Factory's `num_samples` / `max_samples`
    selection): adds the dataset's name and each row's number in the user's file, so report rows and
    errors point at the user's own row even after several datasets were merged or sampled."""
    bound = _signature(wrapped).bind(*args, **kwargs)
    a = bound.arguments
    dataset, data_args = a["dataset"], a.get("data_args")
    name = _loading[-1].pop(0) if _loading and _loading[-1] else None
    out = wrapped(*args, **kwargs)
    if name is None or getattr(data_args, "streaming", False) or not hasattr(out, "add_column") or not hasattr(dataset, "__len__"):
        return out
    indices = getattr(dataset, "_indices", None)  # a selection (num_samples) keeps the file's row numbers here
    rows = indices.column(0).to_pylist() if indices is not None else list(range(len(dataset)))
    if len(rows) != len(out):
        return out
    tag = hashlib.sha256(f"{getattr(out, '_fingerprint', '')}|vlpatch source {name}".encode()).hexdigest()[:16]
    out = out.add_column(SOURCE_COLUMN, [name] * len(out), new_fingerprint=tag)
    return out.add_column(ROW_COLUMN, rows, new_fingerprint=tag[::-1])


def _run_wrapper(wrapped, instance, args, kwargs):
    """loader._get_preprocessed_dataset: one report run per dataset split."""
    bound = _signature(wrapped).bind(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    dataset, data_args, training_args = a["dataset"], a["data_args"], a["training_args"]
    if dataset is None:
        return wrapped(*args, **kwargs)
    is_eval = bool(a.get("is_eval"))
    names = (data_args.eval_dataset if is_eval else data_args.dataset) or []
    names = [names] if isinstance(names, str) else list(names)
    cfg = engine.config()
    path = cfg.report or os.path.join(getattr(training_args, "output_dir", None) or ".", "vlpatch_report.jsonl")
    split = "eval" if is_eval else "train"
    meta = {}
    reencodes = core.get_policy(cfg.policy).reencodes
    if reencodes:
        meta["shrink_dir"] = os.path.abspath(cfg.shrink_dir or os.path.join(getattr(training_args, "output_dir", None) or ".", "vlpatch_media"))
    run = report.start_run(
        TRAINER,
        f"{split} {','.join(names)} (stage {a['stage']})",
        path,
        dataset=",".join(names),
        split=split,
        cutoff_len=data_args.cutoff_len,
        policy=cfg.policy,
        **meta,
    )
    if not getattr(data_args, "streaming", False) and hasattr(dataset, "add_column") and hasattr(dataset, "__len__"):
        old = getattr(dataset, "_fingerprint", "") or ""
        tag = f"{old}|vlpatch {__version__}|{cfg.policy}|{cfg.media_first}"
        if reencodes:
            tag += f"|{cfg.shrink_min_pixels}|{cfg.shrink_min_frames}|{cfg.shrink_fallback}|{meta['shrink_dir']}"
        a["dataset"] = dataset.add_column(
            INDEX_COLUMN, list(range(len(dataset))), new_fingerprint=hashlib.sha256(tag.encode()).hexdigest()[:16]
        )
    quiet = getattr(training_args, "local_process_index", 0) != 0
    try:
        out = wrapped(*bound.args, **bound.kwargs)
    except BaseException:
        report.end_run(run, quiet=quiet)
        raise
    counts = report.end_run(run, quiet=quiet)
    too_much_bad_input(run, counts, cfg.max_bad, f"{split} {','.join(names)}")
    return out


def too_much_bad_input(run, counts, max_bad: float, where: str) -> None:
    """Bad input is dropped and reported one sample at a time, but a wrong media_dir or dataset path
    makes much of a dataset bad: above `max_bad` (VLPATCH_MAX_BAD) of the samples, stop before training,
    with the count and the first few samples."""
    bad = run.reasons.get("bad_input", 0)
    total = sum(counts.values())
    if not core.too_much_bad(bad, total, max_bad):
        return
    first = report.run_rows(run, limit=3, where=lambda r: str(r.get("reason", "")).startswith("bad_input"))
    named = "; ".join(
        f"{_describe(r.get('index'), r.get('batch_position'), r.get('source_dataset'), r.get('source_row'))}: {r['reason'][:160]}"
        for r in first
    )
    raise core.VLPatchError(
        f"vlpatch: {bad} of {total} samples ({bad / total:.0%}) of {where} have bad input, more than "
        f"VLPATCH_MAX_BAD ({max_bad:.0%}): a wrong media_dir or dataset path? First: {named}. Every one is in "
        f"{run.report_path}. Fix the data, or raise VLPATCH_MAX_BAD to drop them and train anyway"
    )


WRAPPERS = {
    "run": _run_wrapper,
    "merged": _merged_wrapper,
    "source_rows": _source_wrapper,
    "record_split": _record_split,
    "batch": _batch_wrapper(overlong_drop=False),
    "batch_packed": _batch_wrapper(overlong_drop=True),
    "encode_supervised": _encode_wrapper("supervised"),
    "encode_pairwise": _encode_wrapper("pairwise"),
    "encode_feedback": _encode_wrapper("feedback"),
    "encode_unsupervised": _encode_wrapper("unsupervised"),
    "sized_images": _sized_images,
}


def selftest(spec) -> tuple:
    """`vlpatch doctor`: the installed LLaMA-Factory's real SupervisedDatasetProcessor and qwen2_vl
    plugin on one sample whose cut falls on its image run (in-memory tokenizer, the real
    Qwen2VLImageProcessor, a 56 px image: no download). Patched, the run stays whole and is reported."""
    import tempfile
    import types

    from PIL import Image
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessor

    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.data.processor import SupervisedDatasetProcessor
    from llamafactory.hparams import DataArguments

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    vocab = {w: i for i, w in enumerate(specials + ["<unk>", "system", "user", "assistant", "word", "a", "red", "square"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<|endoftext|>", eos_token="<|im_end|>", additional_special_tokens=specials[1:]
    )
    image_processor = Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=56 * 56)
    holder = types.SimpleNamespace(image_processor=image_processor, image_max_pixels=56 * 56, image_min_pixels=28 * 28)
    cutoff = 40
    data_args = DataArguments(template="qwen2_vl", cutoff_len=cutoff)
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    processor = SupervisedDatasetProcessor(template=template, tokenizer=tokenizer, processor=holder, data_args=data_args)
    examples = {
        "_prompt": [[{"role": "user", "content": "word " * 60 + "<image>"}]],
        "_response": [[{"role": "assistant", "content": "a red square"}]],
        "_system": [""],
        "_tools": [""],
        "_images": [[Image.new("RGB", (56, 56), (200, 30, 30))]],
        "_videos": [None],
        "_audios": [None],
    }
    scratch = tempfile.mkdtemp(prefix="vlpatch-selftest-")
    path = os.path.join(scratch, "report.jsonl")
    run = report.start_run(TRAINER, "doctor self-test", path)
    try:
        out = processor.preprocess_dataset(examples)
    finally:
        report.end_run(run, quiet=True)
    ids = out["input_ids"][0] if out["input_ids"] else []
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    start, end = (tokenizer.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>"))
    rows = report.read_report(path) if os.path.exists(path) else []
    shutil.rmtree(scratch, ignore_errors=True)  # every doctor run left one in /tmp
    whole = ids.count(pad) == 4 and ids.count(start) == 1 and ids.count(end) == 1
    ok = whole and len(ids) <= cutoff and [r["action"] for r in rows] == ["truncated"]
    return ok, (
        f"qwen2_vl sample of {rows[0]['tokens_before'] if rows else '?'} tokens cut to {len(ids)} <= cutoff_len {cutoff}, "
        f"image run {'whole' if whole else 'BROKEN'}, {len(rows)} report row(s)"
    )


def wrappers(spec, version=None) -> dict:
    return WRAPPERS
