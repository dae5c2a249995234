"""The pure core: media token runs, budgets and policies.

Nothing here imports torch, transformers or any trainer. Integrations describe a sample as one or more
`Layout`s (a token sequence cut into turns, in the order the trainer spends its budget) and hand it to
`resolve`, which returns a `Decision`: which positions to keep, which media items were removed, and
what to report. The invariants (checked by the property tests):

* every kept layout is at most its budget long;
* every media run is kept whole or removed whole, never split;
* the media items a decision removes are exactly those whose runs are gone, in every layout;
* kept positions are increasing, so labels and any other per-token list stay aligned with input_ids.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import cached_property
from itertools import chain, repeat
from operator import attrgetter, itemgetter
from typing import Callable, Iterable, Mapping, Sequence

from .errors import POLICY_NAMES, SampleError, VLPatchError  # noqa: F401  (re-exported)

MEDIA_KINDS = ("image", "video", "audio")
UNBOUNDED = 1 << 40  # a token budget no sample reaches: the trainer's own encode, uncut
PLACEHOLDERS = {"image": "<image>", "video": "<video>", "audio": "<audio>"}

SplitFn = Callable[[int, int, int], "tuple[int, int]"]


# --------------------------------------------------------------------------- media runs


@dataclass(frozen=True)
class MediaKind:
    """How one kind of media shows in the token ids.

    `body` holds the repeated token(s) (Qwen2-VL `<|image_pad|>`), `start` / `end` the optional boundary
    tokens (`<|vision_start|>`, `<|vision_end|>`). `item_tokens` is set where every item is exactly that
    many body tokens (Mllama: one `<|image|>` per image), so adjacent items can be told apart.
    """

    kind: str
    body: frozenset
    start: int | None = None
    end: int | None = None
    item_tokens: int | None = None


@dataclass(frozen=True)
class Run:
    """A protected span [start, stop) holding `items` media items of one kind, from item `first` on;
    or, where `members` is set, exactly those items (a Qwen2.5-Omni video with its own audio inside)."""

    kind: str
    start: int
    stop: int
    first: int = 0
    items: int = 1
    members: tuple = ()

    @property
    def length(self) -> int:
        return self.stop - self.start

    def keys(self) -> list:
        if self.members:
            return list(self.members)
        if self.items == 1:
            return [(self.kind, self.first)]
        return [(self.kind, self.first + k) for k in range(self.items)]


class RunFinder:
    """Finds the media runs of a token sequence for a set of `MediaKind`s."""

    def __init__(self, kinds: Iterable[MediaKind]):
        self.kinds = {k.kind: k for k in kinds}
        self._body = {}
        self._starts = set()
        for k in self.kinds.values():
            for tok in k.body:
                self._body[tok] = k
            if k.start is not None:
                self._starts.add(k.start)

    def find(self, ids: Sequence[int]) -> list[Run]:
        """Maximal runs: [start] body+ [end]. Item indices are not assigned yet (see `assign_items`)."""
        runs: list[Run] = []
        body, starts = self._body, self._starts
        n = len(ids)
        i = 0
        while i < n:
            tok = ids[i]
            if tok in starts:
                j = i + 1
                kind = body.get(ids[j]) if j < n else None
                if kind is None or kind.start != tok:
                    i += 1
                    continue
                j = self._body_end(ids, j, kind)
                if kind.end is not None and j < n and ids[j] == kind.end:
                    j += 1
                runs.append(Run(kind.kind, i, j))
                i = j
            elif tok in body:
                kind = body[tok]
                j = self._body_end(ids, i, kind)
                if kind.end is not None and j < n and ids[j] == kind.end:
                    j += 1
                runs.append(Run(kind.kind, i, j))
                i = j
            else:
                i += 1
        return runs

    @staticmethod
    def _body_end(ids: Sequence[int], j: int, kind: MediaKind) -> int:
        n, bodyset = len(ids), kind.body
        while j < n and ids[j] in bodyset:
            j += 1
        return j

    def body_count(self, ids: Sequence[int], run: Run) -> int:
        bodyset = self.kinds[run.kind].body
        return sum(1 for t in ids[run.start : run.stop] if t in bodyset)

    def count_items(self, ids: Sequence[int], runs: list[Run]) -> Counter:
        """Items per kind as the tokens alone tell them: `item_tokens` body tokens per item where the
        layout fixes it (adjacent Mllama images are one run of several items), else one per run."""
        counts: Counter = Counter()
        for r in runs:
            per = self.kinds[r.kind].item_tokens
            counts[r.kind] += self.body_count(ids, r) // per if per else 1
        return counts

    def assign_items(self, ids: Sequence[int], runs: list[Run], counts: Mapping[str, int]) -> list[Run]:
        """Number the items of each run so that run k of a kind holds items [first, first + items).

        Raises `ValueError` (the caller turns it into a reported bad sample) when the runs cannot hold
        exactly `counts[kind]` items: a placeholder count that differs from the media count.
        """
        out: list[Run] = []
        for kind in {r.kind for r in runs} | {k for k, c in counts.items() if c}:
            kruns = [r for r in runs if r.kind == kind]
            want = counts.get(kind, 0)
            spec = self.kinds.get(kind)
            if spec is None:
                raise ValueError(f"{want} {kind}(s) but no known {kind} token layout")
            sizes = [1] * len(kruns)
            if spec.item_tokens:
                sizes = [self.body_count(ids, r) // spec.item_tokens for r in kruns]
            elif len(kruns) != want and kruns and want and spec.start is None:
                # adjacent placeholders merge into one run: split it when every item has the same length
                total = sum(self.body_count(ids, r) for r in kruns)
                per = total // want if total % want == 0 else 0
                if per and all(self.body_count(ids, r) % per == 0 for r in kruns):
                    sizes = [self.body_count(ids, r) // per for r in kruns]
            if sum(sizes) != want:
                raise ValueError(f"{sum(sizes)} {kind} token run(s) in the text but {want} {kind}(s) given")
            first = 0
            for r, size in zip(kruns, sizes):
                out.append(Run(r.kind, r.start, r.stop, first, size))
                first += size
        return sorted(out, key=lambda r: r.start)


def finder_from_table(table: Mapping, tokenizer, *owners) -> RunFinder:
    """A RunFinder from a matrix `media_tokens` entry ({kind: {start, body, end, item_tokens}}).

    Token strings become ids through `tokenizer.convert_tokens_to_ids`; "@name" is read from the first
    of `owners` (the plugin, the processor, the tokenizer) that has it. A kind whose tokens this
    tokenizer does not know is left out: it stays uncovered.
    """
    unk = getattr(tokenizer, "unk_token_id", None)

    def tid(text):
        if text.startswith("@"):
            text = next((getattr(o, text[1:]) for o in owners if getattr(o, text[1:], None)), None)
        if not text:
            return None
        i = tokenizer.convert_tokens_to_ids(text)
        return None if i is None or (unk is not None and i == unk and text != getattr(tokenizer, "unk_token", None)) else i

    kinds = []
    for kind, spec in table.items():
        body = [tid(b) for b in (spec["body"] if isinstance(spec["body"], list) else [spec["body"]])]
        start = tid(spec["start"]) if spec.get("start") else None
        end = tid(spec["end"]) if spec.get("end") else None
        if None in body or (spec.get("start") and start is None) or (spec.get("end") and end is None):
            continue
        kinds.append(MediaKind(kind, frozenset(body), start, end, spec.get("item_tokens")))
    return RunFinder(kinds)


# --------------------------------------------------------------------------- learned spans


@dataclass(frozen=True)
class Expansion:
    """What a trainer wrote into the text for some media items, tokenized on its own.

    `keys` are the items ((kind, index), ...) whose tokens it holds; `tokens` its token ids; `marks` the
    ids that tokenize the same wherever they stand (special and added tokens: `<|vision_start|>`,
    `<|image_pad|>`). The span of such an expansion in a sequence is found from its marked core (first
    to last marked token), which must occur exactly; the text around the core (a Qwen3-VL frame's
    timestamp, Gemma 3's blank lines) belongs to the span as far as it tokenized the same in context.
    """

    keys: tuple
    tokens: tuple
    marks: frozenset

    @cached_property
    def _span(self) -> tuple:
        """(a, b, the core's tokens, {token: its count in the core}, the tokens before the core, those
        after it; lists); computed once per expansion (an integration that keeps its expansions pays it
        once per media size)."""
        marked = [i for i, t in enumerate(self.tokens) if t in self.marks]
        if not marked:
            return 0, 0, [], {}, [], []
        a, b = marked[0], marked[-1] + 1
        return a, b, list(self.tokens[a:b]), Counter(self.tokens[a:b]), list(self.tokens[:a]), list(self.tokens[b:])

    @cached_property
    def _found(self) -> tuple:
        """What `locate` reads for each expansion it finds: (`_span`'s a, b, core, before and after; the
        core's length; the kind, first item and members of the expansion's run)."""
        a, b, core, _, before, after = self._span
        kind, first = self.keys[0]
        return a, b, core, before, after, len(core), kind, first, tuple(self.keys) if len(self.keys) > 1 else ()

    def core(self) -> tuple[int, int]:
        """[a, b) of `tokens`: first to last marked token; (0, 0) when nothing is marked."""
        return self._span[:2]

    def core_count(self, tokens: Iterable[int]) -> int:
        """How many of the core's tokens are among `tokens` (a subset of `marks`: each lies in the core,
        so this is their count in any run `locate` finds for the expansion)."""
        return sum(map(self._span[3].get, tokens, repeat(0)))


def _find(ids: Sequence[int], needle: Sequence[int], start: int) -> int:
    n, m = len(ids), len(needle)
    first = needle[0]
    i = start
    while i <= n - m:
        try:
            i = ids.index(first, i, n - m + 1)
        except ValueError:
            return -1
        if ids[i : i + m] == needle:
            return i
        i += 1
    return -1


def locate(ids: Sequence[int], expansions: Sequence[Expansion], start: int = 0) -> list[Run]:
    """The runs of `expansions` in `ids`, in their order from `start`: each marked core found exactly,
    widened by the text tokens around it that match. An expansion without a marked token holds nothing
    the model counts and gets no run. Raises ValueError (naming the item) when a core is not there."""
    if not isinstance(ids, list):
        ids = list(ids)
    runs: list[Run] = []
    pos = start
    for exp in expansions:
        a, b, core, before, after, size, kind, first, members = exp._found
        if a == b:
            continue
        at = _find(ids, core, pos)
        if at < 0:
            raise ValueError(f"the tokens written for {kind} #{first} are not in the sequence")
        lo, hi = at, at + size
        if before:  # widened token by token, or in one compare where all of it matches
            if at - a >= pos and ids[at - a : at] == before:
                lo = at - a
            else:
                i = a - 1
                while i >= 0 and lo - 1 >= pos and ids[lo - 1] == exp.tokens[i]:
                    lo, i = lo - 1, i - 1
        if after:
            if ids[hi : hi + len(after)] == after:
                hi += len(after)
            else:
                j = b
                while j < len(exp.tokens) and hi < len(ids) and ids[hi] == exp.tokens[j]:
                    hi, j = hi + 1, j + 1
        runs.append(Run(kind, lo, hi, first, 1, members))
        pos = hi
    return runs


def marks_outside(ids: list, runs: Iterable[Run], marks: frozenset, skip: int = 0) -> bool:
    """Whether some media mark of `ids` (after the first `skip` positions) may lie outside every run: False
    where the text between the runs holds none (a set test per gap, far quicker than `stray_marks`'
    counts); True where it holds one, or where runs overlap (then count)."""
    p = last = skip
    for run in sorted(runs, key=_start):
        if run.start < last:
            return True
        if run.start > p and not marks.isdisjoint(ids[p : run.start]):
            return True
        p = last = max(p, run.stop)
    return not marks.isdisjoint(ids[p:])


_start, _stop = attrgetter("start"), attrgetter("stop")


def run_tokens(runs: Iterable[Run], removed: Iterable = ()) -> int:
    """The tokens `runs` hold: the sum of their lengths, in C (a cut sample's report row counts them); with
    `removed` (item keys), those of the runs that keep all their items."""
    if removed:
        removed = set(removed)
        runs = [r for r in runs if removed.isdisjoint(r.keys())]
    else:
        runs = list(runs)
    return sum(map(_stop, runs)) - sum(map(_start, runs))


def stray_marks(ids: Sequence[int], runs: Iterable[Run], marks: frozenset, skip: int = 0) -> int:
    """How many media marks of `ids` (after the first `skip` positions) lie outside every run: tokens
    the model counts that no learned span accounts for. Non-zero means the layout is not understood."""
    if not marks:
        return 0
    if not isinstance(ids, list):
        ids = list(ids)

    def count(part: list) -> int:  # a few marks: one C scan each; many: one count of every id
        if len(marks) <= 8:
            return sum(map(part.count, marks))
        counted = Counter(part)
        return sum(counted[m] for m in marks)

    total = count(ids[skip:] if skip else ids)
    for r in runs:  # runs never overlap: each mark inside one is counted once
        if r.stop > skip:
            total -= count(ids[max(r.start, skip) : r.stop])
    return total


# --------------------------------------------------------------------------- layouts and plans


@dataclass
class Layout:
    """One token sequence to fit into `budget` tokens.

    `turns` lists (source, target) position ranges in the order the trainer spends its budget (for
    LLaMA-Factory: turn by turn, reversed under `mask_history`); `reserved` is the number of positions
    outside all turns that are always kept (a prefix, an efficient-eos token). `split` divides a turn's
    remaining budget between source and target the way the trainer does (LLaMA-Factory's `infer_seqlen`).
    `heads[i]`: the chat frame at the start of turn i's source (the template prefix, the system block,
    the role header: what the trainer's own cut keeps, as it keeps the head of each side), which a cut
    keeps together with that turn's media; where it is known (> 0) the answer keeps at least
    `ANSWER_FLOOR` of its tokens too, and a frame, media and floor that do not fit together go to the
    policy as media that do not fit do. Empty: no frame known, today's arithmetic.
    `tails[i]`: the frame at the start of turn i's target that comes before the answer proper (the
    assistant header, where the integration counts it to the answer side so that the answer keeps its
    role): the answer's floor counts on top of it. Empty: none.
    """

    length: int
    runs: list[Run]
    turns: list[tuple[range, range]]
    budget: int
    split: SplitFn
    reserved: int = 0
    heads: list = field(default_factory=list)
    tails: list = field(default_factory=list)

    def head(self, index: int) -> int:
        return self.heads[index] if index < len(self.heads) else 0

    def tail(self, index: int) -> int:
        return self.tails[index] if index < len(self.tails) else 0

    def fixed_spans(self) -> list[tuple[int, int]]:
        """The positions outside every turn, as [start, stop) spans in order."""
        out: list[tuple[int, int]] = []
        p = 0
        for r in sorted(filter(None, chain.from_iterable(self.turns)), key=_bounds):  # the turns' non-empty ranges
            if r.start > p:
                out.append((p, r.start))
            if r.stop > p:
                p = r.stop
        if self.length > p:
            out.append((p, self.length))
        return out


_bounds = attrgetter("start", "stop")


def relength(layout: Layout, deltas: Mapping) -> Layout | None:
    """`layout` with the runs of `deltas` ({key: tokens more or fewer}) resized and every later position shifted:
    the layout a re-encode would give where only those items' token counts change (Qwen-VL images: the
    text around a run stays). None where a resized run holds several items or lies outside the turns."""
    delta = {}
    for run in layout.runs:
        keys = [k for k in run.keys() if k in deltas]
        if not keys:
            continue
        if len(run.keys()) > 1 or not any(run.start in r and run.stop <= r.stop for turn in layout.turns for r in turn):
            return None  # several items in one run, or a run outside the turns (counted in `reserved`)
        delta[run.stop] = deltas[keys[0]]
    stops = sorted(delta)

    def at(p: int) -> int:  # a boundary (never inside a run) after the changes
        return p + sum(delta[s] for s in stops if s <= p)

    runs = []
    for run in layout.runs:
        start = at(run.start)
        runs.append(replace(run, start=start, stop=start + run.length + delta.get(run.stop, 0)))
    turns = [(range(at(src.start), at(src.stop)), range(at(tgt.start), at(tgt.stop))) for src, tgt in layout.turns]
    return replace(layout, length=at(layout.length), runs=runs, turns=turns)


@dataclass
class Plan:
    kept: list[int]
    lost: set = field(default_factory=set)  # item keys of the first budgeted turn whose runs did not fit
    left: set = field(default_factory=set)  # item keys of later turns that leave with the part cut off
    partly: bool = False  # some of `left` left a later turn that is partly kept (else only whole turns)


class _Segment:
    """One side of a turn with removed runs taken out: `pieces` in order, each a [start, stop) span of
    text (`run` None) or a whole run; `runs` the runs among them; `text` and `media` their positions."""

    __slots__ = ("pieces", "runs", "text", "media", "length")

    def __init__(self, pieces: list, runs: list, text: int, media: int):
        self.pieces, self.runs, self.text, self.media = pieces, runs, text, media
        self.length = text + media


def _segment(positions: range, runs: list, starts: list, removed: set) -> _Segment:
    """The segment `positions` with removed runs taken out, and the runs (whole) that lie in it (a run
    that starts in the segment but ends after it counts as text). `runs` in order of `starts`, their
    starts. Spans, not positions: a plan costs per run, not per token."""
    p, stop = positions.start, positions.stop
    first, last = bisect.bisect_left(starts, p), bisect.bisect_left(starts, stop)
    if first == last:  # text alone
        return _Segment([(p, stop, None)] if stop > p else [], [], max(0, stop - p), 0)
    pieces: list = []
    seg_runs: list[Run] = []
    text = media = 0
    for run in runs[first:last]:
        a, b = run.start, run.stop
        if a < p or b > stop:
            continue
        if a > p:
            pieces.append((p, a, None))
            text += a - p
        if not (removed and _is_removed(run, removed)):
            seg_runs.append(run)
            pieces.append((a, b, run))
            media += b - a
        p = b
    if stop > p:
        pieces.append((p, stop, None))
        text += stop - p
    return _Segment(pieces, seg_runs, text, media)


def _is_removed(run: Run, removed: set) -> bool:
    return any(k in removed for k in run.keys())


def _inside(positions: range, runs: list, starts: list, removed: set) -> list:
    """The runs `_segment(positions, ...)` keeps (whole inside, not removed), without its pieces."""
    p, stop = positions.start, positions.stop
    out = []
    for run in runs[bisect.bisect_left(starts, p) : bisect.bisect_left(starts, stop)]:
        if run.start < p or run.stop > stop:
            continue
        if not (removed and _is_removed(run, removed)):
            out.append(run)
        p = run.stop
    return out


def keep_head(seg: _Segment, keep: int, head: int = 0):
    """Keep `keep` positions of `seg`: the first `head` text tokens (the chat frame, which lies before
    the first run), whole runs in order while they fit beside it, then the next text tokens. Where the
    frame alone takes `keep` or more, every run is lost and the first `keep` positions stay, as the
    trainer keeps them.

    Without media this is exactly the segment's first `keep` positions, LLaMA-Factory's own slice.
    Returns (kept [start, stop) spans in order, lost runs).
    """
    if keep >= seg.length:
        return list(map(_span, seg.pieces)), []
    if not seg.runs and len(seg.pieces) == 1:  # one stretch of text: its first `keep` positions
        start = seg.pieces[0][0]
        return ([(start, start + keep)] if keep > 0 else []), []
    media_budget = keep - head
    keeping, lost = set(), []
    text_left = keep
    for run in seg.runs:
        size = run.stop - run.start
        if size <= media_budget:
            keeping.add(run.start)
            media_budget -= size
            text_left -= size
        else:
            lost.append(run)
            media_budget = -1  # later runs are lost too: media stay in order, trailing ones go
    # in order: the first `text_left` text positions, and the kept runs whole
    kept: list = []
    for a, b, run in seg.pieces:
        if run is None:
            take = min(b - a, text_left)
            if take > 0:
                kept.append((a, a + take))
                text_left -= take
        elif run.start in keeping:
            kept.append((a, b))
    return kept, lost


_span = itemgetter(0, 1)  # a piece's [start, stop)


# Where a turn's chat frame is known, the answer of a row vlpatch cuts keeps at least this many of its
# tokens (all of them where it is shorter): a row whose frame and media leave its answer fewer goes to the
# policy, as media that do not fit do (docs/policies.md: what a cut row keeps).
ANSWER_FLOOR = 1


# The messages whose content a chat frame leaves out (`emptied`): what the user, the assistant and a tool
# say, under the role names LLaMA-Factory and the Hugging Face chat formats use. A system message stays (it
# is the frame), and so does a function call, whose content is JSON that a template's formatter parses.
CONTENT_ROLES = frozenset({"user", "assistant", "observation", "human", "gpt", "model"})


def emptied(messages: Sequence[dict]) -> list[dict]:
    """`messages` with the content of every `CONTENT_ROLES` message left out (an empty list where the
    content is a list of parts, else an empty string): encoded by the trainer's template, it gives the
    chat frame that `frame_of` finds at the start of the real encoding."""
    return [{**m, "content": [] if isinstance(m.get("content"), (list, tuple)) else ""}
            if (m.get("role") or m.get("from")) in CONTENT_ROLES else dict(m) for m in messages]


def frame_of(source: Sequence[int], empty: Sequence[int]) -> int:
    """The chat frame at the start of `source`: its longest common prefix with `empty`, the same turn
    encoded with the user's content left out (system block and role header; a token that the content
    merges into at the boundary is the content's). Never longer than `empty`."""
    n = min(len(source), len(empty))
    a, b = source[:n], empty[:n]
    if type(a) is not list or type(b) is not list:  # noqa: E721 - a list's slice is already a copy
        a, b = list(a), list(b)
    if a == b:
        return n
    guess = _frames.get(len(empty), 0)  # the frame found last for a turn like it: checked, as any answer
    if 0 < guess < n and a[guess] != b[guess] and a[:guess] == b[:guess]:
        return guess
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]: halve the difference with slice compares
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    if len(_frames) >= 4096:
        _frames.clear()
    _frames[len(empty)] = lo
    return lo


_frames: dict = {}  # len(empty) -> the frame_of found last: samples of one template share their frames


def _head_text(seg: _Segment, head: int) -> int:
    """`head` clipped to the text before the segment's first run (a frame holds no media; the caller
    keeps no frame for a segment without runs: there the trainer's own cut decides)."""
    before = 0
    for a, b, run in seg.pieces:
        if run is not None:
            break
        before += b - a
    return min(head, before)


def seqlen_split(source_len: int, target_len: int, cutoff_len: int) -> tuple:
    """LLaMA-Factory's `infer_seqlen` arithmetic, for a trainer that has no split of its own (ms-swift):
    an answer shorter than half the budget keeps all of it, a prompt shorter than half keeps all of it,
    else each side keeps its share of the budget."""
    if target_len * 2 < cutoff_len:
        max_target = cutoff_len
    elif source_len * 2 < cutoff_len:
        max_target = cutoff_len - source_len
    else:
        max_target = int(cutoff_len * (target_len / (source_len + target_len)))
    target = min(max_target, target_len)
    return min(max(cutoff_len - target, 0), source_len), target


def _widened(s: int, t: int, remaining: int, s_media: int, t_media: int) -> tuple:
    """The trainer's own split (s, t) of `remaining`, widened so each side can hold its media (and the
    source its frame, the target its floor: both counted in `s_media` / `t_media` by the caller) where
    both fit."""
    if s_media + t_media > remaining:
        return s, t  # media do not fit: keep_head reports the runs that are lost
    s = max(s, s_media)
    t = max(min(t, remaining - s), t_media)
    if s + t > remaining:
        s = remaining - t
    return s, t


def plan_layout(layout: Layout, removed: set = frozenset()) -> Plan:
    runs = layout.runs
    starts = [r.start for r in runs]
    if starts != sorted(set(starts)):  # in order, one run per start
        runs = sorted({r.start: r for r in runs}.values(), key=lambda r: r.start)
        starts = [r.start for r in runs]
    kept = layout.fixed_spans()
    lost: set = set()
    left: set = set()
    partly = False
    total = layout.reserved
    for index, (src, tgt) in enumerate(layout.turns):
        # the media of the turn the trainer budgets first must stay (else the policy decides); those of a
        # later turn leave with the part of it the trainer's own budget cuts off
        gone = left if index else lost
        if total >= layout.budget:  # LLaMA-Factory stops adding turns here: their media leave with them
            for run in _inside(src, runs, starts, removed) + _inside(tgt, runs, starts, removed):
                gone.update(run.keys())
            continue
        remaining = layout.budget - total
        if not removed:  # each segment is as long as its range
            s, t = layout.split(len(src), len(tgt), remaining)
            if len(src) <= s and len(tgt) <= t and s + t <= remaining:
                # the trainer keeps the whole turn: so does the plan below (widening changes nothing, no
                # frame, media or floor is left out), without its segments
                kept.append((src.start, src.stop))
                kept.append((tgt.start, tgt.stop))
                total += s + t
                continue
        source, target = _segment(src, runs, starts, removed), _segment(tgt, runs, starts, removed)
        if removed:
            s, t = layout.split(source.length, target.length, remaining)
        head = _head_text(source, layout.head(index)) if source.runs else 0  # text alone: the trainer's cut
        floor = min(target.text, layout.tail(index) + ANSWER_FLOOR) if head else 0
        s, t = _widened(s, t, remaining, source.media + head, target.media + floor)
        if not index and head and source.media + head + target.media + floor > remaining:
            # the frame, the media and the answer's floor do not fit together: the media that do not fit
            # beside the frame within what the answer leaves are lost (the policy decides)
            s = min(s, remaining - target.media - floor)
        s_keep, s_lost = keep_head(source, s, head)
        t_keep, t_lost = keep_head(target, t)
        for run in s_lost + t_lost:
            gone.update(run.keys())
            partly = partly or bool(index)
        kept.extend(s_keep)
        kept.extend(t_keep)
        total += s + t
    kept.sort()
    return Plan(Kept(kept), lost, left, partly)


class Kept(list):
    """A plan's kept positions (a list of them, increasing), with the [start, stop) `spans` they come
    from, in order: an integration may take a sequence's kept tokens by slices (`take`)."""

    __slots__ = ("spans",)

    def __init__(self, spans: list):
        super().__init__()
        ints = _positions
        for a, b in spans:
            if b > len(ints):
                ints = _more_positions(b)
            self += ints[a:b]  # the shared int objects, in C (no int made per position past 256)
        self.spans = spans


# 0, 1, 2, ...: the int objects that `Kept` lists take their positions from, made for the longest sequence
# planned so far instead of once a plan (a cut Gemma 3 sample with its 256-token runs keeps some 650
# positions: about 11 us to make, 2 us to slice)
_positions: list = []
_POSITIONS_MAX = 1 << 18


def _more_positions(stop: int):
    """Positions at least up to `stop`: a new shared list (replaced, never extended: threads may plan at
    once), or past _POSITIONS_MAX a range (its slices are ranges: positions made as before)."""
    global _positions
    if stop > _POSITIONS_MAX:
        return range(stop)
    _positions = list(range(min(max(stop, 2 * len(_positions)), _POSITIONS_MAX)))
    return _positions


def take(seq: Sequence, kept: Sequence[int]) -> list:
    """`seq` at the positions `kept`: by its spans where `kept` is a `Kept` (slices, in C), else one
    position at a time."""
    spans = getattr(kept, "spans", None)
    if spans is not None:
        out: list = []
        for a, b in spans:
            out += seq[a:b]
        return out
    if len(kept) > 1:
        return list(itemgetter(*kept)(seq))
    return [seq[p] for p in kept]


# --------------------------------------------------------------------------- policies


# Reason codes the core decides (a sample's `Decision.code`, the run summary's counts; the integrations add
# theirs for input they refuse: bad_input, uncovered_media, ...): docs/report.md lists them all
TEXT_OVER_BUDGET = "text_over_budget"  # text cut, every media item kept whole
MEDIA_LEFT_WITH_TURN = "media_left_with_turn"  # a later turn's media left with the part of it the budget cuts off
REASON_CODES = (TEXT_OVER_BUDGET, MEDIA_LEFT_WITH_TURN, "media_exceed_budget", "media_shrunk", "shrink_failed",
                "shrink_unavailable", "bad_input", "uncovered_media", "truncation_strategy_delete", "media_not_removable")


@dataclass
class Decision:
    """What happens to one sample. `kept[i]` are the positions kept of layout i (None when dropped)."""

    action: str  # "kept" | "truncated" | "dropped" | "media_dropped" | "shrunk"
    kept: list | None
    removed: list = field(default_factory=list)  # item keys removed (drop_media)
    reason: str = ""  # for the report: starts with `code`, then the detail (and any later notes, "; "-joined)
    resized: "Resized | None" = None  # shrink: the re-encoded sample that `kept` indexes
    code: str = TEXT_OVER_BUDGET  # what the run summary counts the sample under


def because(code: str, detail: str) -> dict:
    """A decision's `code` (one of `REASON_CODES`) and its `reason` (the code, then the detail):
    `Decision(..., **because(...))`."""
    assert code in REASON_CODES, code
    return {"code": code, "reason": f"{code}: {detail}"}


@dataclass
class Overflow:
    """Handed to a policy when a sample's media cannot all stay whole within the budget.

    `replan(removed)` plans every layout again with the given media items taken out. The `shrink`
    policy re-encodes the sample with smaller media through `reencode(scale)` (an integration provides
    it; see `Resized`), and `settle(layouts)` plans a re-encoded sample as `resolve` would.
    """

    sample: str
    layouts: list
    plans: list
    replan: Callable
    reencode: Callable | None = None
    settle: Callable | None = None

    def must_stay(self) -> list:
        """Keys of the media in the turn each layout budgets first: what a policy must make fit."""
        return first_turn_keys(self.layouts)

    @property
    def lost(self) -> set:
        out: set = set()
        for p in self.plans:
            out |= p.lost
        return out

    def describe(self) -> str:
        lost = sorted(self.lost)
        runs = [r for r in self.layouts[0].runs if set(r.keys()) & set(lost)]
        first = self.layouts[0].turns[0] if self.layouts[0].turns else (range(0), range(0))
        need = sum(r.length for r in self.layouts[0].runs if r.start in first[0] or r.start in first[1])
        frame = self.layouts[0].head(0)
        return (
            f"the media that must stay (the first budgeted turn's) need {need}"
            + (f" beside its chat frame of {frame}" if frame else "") + f" of {self.layouts[0].budget} tokens; "
            f"{len(lost)} item(s) would be cut: " + ", ".join(f"{k}#{i}" for k, i in lost)
            + (f" ({run_tokens(runs)} tokens)" if runs else "")
        )


class Policy:
    name = "?"
    reencodes = False  # it may encode a sample again with smaller media (`Overflow.reencode`): shrink
    stops = False  # a sample it cannot keep, bad input included, stops the run rather than leave: error

    def resolve(self, case: Overflow) -> Decision:  # pragma: no cover - interface
        raise NotImplementedError


class DropPolicy(Policy):
    name = "drop"

    def resolve(self, case: Overflow) -> Decision:
        return Decision("dropped", None, **because("media_exceed_budget", case.describe()))


class ErrorPolicy(Policy):
    name = "error"
    stops = True

    def resolve(self, case: Overflow) -> Decision:
        raise SampleError(case.sample, "media do not fit the budget", case.describe())


class DropMediaPolicy(Policy):
    """Remove trailing whole media items (and their list entries) until the rest fits."""

    name = "drop_media"

    def resolve(self, case: Overflow) -> Decision:
        removed: set = set()
        plans = case.plans
        while True:
            lost = set().union(*(p.lost for p in plans))
            if not lost:
                break
            last = max(lost, key=lambda key: _item_position(case.layouts, key))
            removed.update(_companions(case.layouts, last))  # items sharing a span leave together
            plans = case.replan(removed)
        return Decision(
            "media_dropped",
            [p.kept for p in plans],
            removed=sorted(removed),
            **because("media_exceed_budget", case.describe()),
        )


class ShrinkUnavailable(Exception):
    """Raised by an integration's `reencode(scale)` that finds nothing in the sample it can downsize (it
    measures the media on its first call, so a sample whose text alone is cut costs nothing): the
    fallback decides, reported as `shrink_unavailable: <the message>`."""


@dataclass
class Resized:
    """A sample re-encoded with smaller media, from an integration's `reencode(scale)`.

    `scale` is the share of each shrinkable item's pixels asked for (1.0: as it came; a video's pixels
    times its frames); `sizes` lists (key, before, after) for every item whose size changed, each a
    (w, h), or (w, h, frames) for a video; `floor` is True when every
    shrinkable item is at its floor (a smaller scale changes nothing); `payload` is the integration's.
    """

    scale: float
    layouts: list
    sizes: list
    floor: bool
    payload: object = None


@dataclass
class ShrinkItem:
    """One medium the shrink search may downsize: its size as the processor will see it (`seen`, after
    the trainer's own max-pixels cap), as it came (`file`, what reports call "before"), its pixels floor;
    for a video also the frames the trainer samples and their floor. A video loses pixels down to the
    floor, then frames."""

    seen: tuple
    file: tuple
    floor: int
    frames: int = 0  # a video's sampled frames; 0: an image
    min_frames: int = 0
    frame_step: int = 1  # fewer frames are asked for in multiples of this (a reader that rounds to it)

    def candidate(self, scale: float):
        """(after, at the floor) for `scale`, the share of the item's pixels (times its frames for a
        video) asked for: after is (w, h), or (w, h, frames) for a video; None when nothing changes."""
        w, h = self.seen
        want = w * h * scale
        px = min(w * h, max(self.floor, want))
        frames = max(self.min_frames, min(self.frames, int(self.frames * want / px))) if self.frames else 0
        if self.frame_step > 1 and frames < self.frames:
            frames = max(self.min_frames, frames - frames % self.frame_step)
        if px >= w * h and frames >= self.frames:
            return None
        f = (px / (w * h)) ** 0.5
        size = (max(1, int(w * f)), max(1, int(h * f)))
        if not self.frames:
            return size, want <= self.floor
        return (*_even(size), frames), want <= self.floor and frames <= self.min_frames

    def before(self) -> tuple:
        return (*self.file, self.frames) if self.frames else tuple(self.file)

    def sharp(self, after: tuple) -> tuple:
        """A video that lost frames with its pixels at the floor, with its pixels back: where the sample
        still fits so, more of each frame at the same frame count (a processor with a minimum size, as
        Qwen2-VL's video processor, gains nothing from smaller frames, only from fewer)."""
        return (*_even(self.seen), after[2]) if self.frames and after[2] < self.frames else after


def _even(size) -> tuple:  # video frames have even sides (MPEG-4, yuv420p)
    return (max(2, size[0] // 2 * 2), max(2, size[1] // 2 * 2))


def shrink_candidates(items: Mapping, scale: float) -> tuple:
    """(changed, at the floor, sharp) for `scale` over {key: ShrinkItem}: changed lists (key, before,
    after) for each item that changes; sharp is the same with every video's pixels back (`ShrinkItem.sharp`),
    to try first, or None where it is the same."""
    changed, floor = [], True
    for key, item in items.items():
        got = item.candidate(scale)
        if got is None:
            continue
        after, at_floor = got
        floor = floor and at_floor
        changed.append((key, item.before(), after))
    sharp = [(key, b, items[key].sharp(a)) for key, b, a in changed]
    return changed, floor, (None if sharp == changed else [x for x in sharp if x[2] != x[1]])


def first_fitting(tries: Iterable):
    """The first `Resized` of `tries` (encoded lazily, in order) whose layouts fit, else the last one."""
    last = None
    for resized in tries:
        if fits(resized.layouts) is not None:
            return resized
        last = resized
    return last


def pick_frames(total: int, keep: int) -> list:
    """Which of `total` frames (positions) a `keep`-frame copy keeps: spread evenly, first and last in."""
    if keep >= total:
        return list(range(total))
    return sorted({round(k * (total - 1) / (keep - 1)) for k in range(keep)}) if keep > 1 else [0]


SHRINK_STEPS = 10  # re-encodes one sample may take (the first estimate usually fits)
SHRINK_PRECISION = 1.04  # stop refining once the fitting scale is within 4% of one that does not fit


class ShrinkPolicy(Policy):
    """Keep the sample by downsizing the media that must stay, to the largest scale at which it fits.

    Token counts follow the pixel count (every known processor tiles or patches the resized image), so
    the first scale tried is the share of the budget the media may take; each re-encode measures the real
    count and refines. Below the floor (`Resized.floor`), `fallback` decides.
    """

    name = "shrink"
    reencodes = True

    def __init__(self, fallback: Policy | None = None):
        self.fallback = fallback or DropPolicy()

    def resolve(self, case: Overflow) -> Decision:
        if case.reencode is None or case.settle is None:
            return self._fall(case, "shrink_unavailable", "this trainer cannot re-encode the sample")
        keys = set(case.must_stay())
        layout = case.layouts[0]
        avail = max(1, layout.budget - layout.reserved)
        tokens = _tokens_of(layout, keys)
        lo, hi = None, 1.0  # (scale, resized, plans) that fits; the smallest scale known not to fit
        scale = min(1.0, avail / max(1, tokens)) * 0.97
        floor_hit, last = None, tokens
        for _ in range(SHRINK_STEPS):
            try:
                resized = case.reencode(scale)
            except ShrinkUnavailable as exc:
                return self._fall(case, "shrink_unavailable", str(exc))
            if resized is None:
                break
            plans = case.settle(resized.layouts)
            if plans is not None:
                lo = (scale, resized, plans)
                if hi / scale <= SHRINK_PRECISION:
                    break
                # aim at the budget from here (tokens follow the area); within the precision: done
                now = _tokens_of(resized.layouts[0], keys)
                aim = scale * avail / max(1, now)
                if aim <= scale * SHRINK_PRECISION:
                    break
                scale = min(aim, (scale * hi) ** 0.5) if aim < hi else (scale * hi) ** 0.5
                continue
            hi = scale
            if lo is not None:  # bisect between what fits and what does not
                if hi / lo[0] <= SHRINK_PRECISION:
                    break
                scale = (lo[0] * hi) ** 0.5
                continue
            if resized.floor:
                floor_hit = resized
                break
            now = _tokens_of(resized.layouts[0], keys)
            # no progress: the processor caps the size below this scale (Pixtral's longest edge): jump
            scale = scale * (0.35 if now >= last else min(0.9, avail / max(1, now) * 0.97))
            last = now
        if lo is None:
            why = "it does not fit even with its media at the floor (VLPATCH_SHRINK_MIN_PIXELS, VLPATCH_SHRINK_MIN_FRAMES)" if floor_hit is not None else f"no fitting size in {SHRINK_STEPS} tries"
            return self._fall(case, "shrink_failed", why)
        scale, resized, plans = lo
        # an item whose tokens did not change (the processor's rounding) stays as it came
        resized.sizes = [
            (key, b, a) for key, b, a in resized.sizes
            if _tokens_of(case.layouts[0], {key}) != _tokens_of(resized.layouts[0], {key})
        ]
        changes = ", ".join(f"{k}#{i} {_size_text(b)} -> {_size_text(a)}" for (k, i), b, a in resized.sizes)
        before, after = _tokens_of(case.layouts[0], keys), _tokens_of(resized.layouts[0], keys)
        return Decision(
            "shrunk",
            [p.kept for p in plans],
            removed=sorted(set().union(*(p.left for p in plans))),
            **because("media_shrunk", f"{case.describe()}; shrunk: {changes} ({before} -> {after} tokens)"),
            resized=resized,
        )

    def _fall(self, case: Overflow, code: str, detail: str) -> Decision:
        decision = self.fallback.resolve(case)
        why = because(code, detail)
        if decision.reason:  # the fallback's decision, counted under its own code; why shrink did not help
            decision.reason += "; " + why["reason"]
        else:
            decision.code, decision.reason = why["code"], why["reason"]
        return decision


def _size_text(size) -> str:
    """(w, h) -> "WxH"; a video's (w, h, frames) -> "WxH x F frames"."""
    text = f"{size[0]}x{size[1]}"
    return f"{text} x {size[2]} frames" if len(size) > 2 else text


def first_turn_keys(layouts) -> list:
    """Keys of the media in the turn each layout budgets first."""
    keys = []
    for layout in layouts:
        if not layout.turns:
            continue
        src, tgt = layout.turns[0]
        for run in layout.runs:
            if (run.start in src or run.start in tgt) and run.keys()[0] not in keys:
                keys.extend(k for k in run.keys() if k not in keys)
    return keys


def _tokens_of(layout, keys) -> int:
    return sum(r.length for r in layout.runs if set(r.keys()) & set(keys))


def _companions(layouts, key) -> set:
    out = {key}
    for layout in layouts:
        for run in layout.runs:
            if key in run.keys():
                out.update(run.keys())
    return out


def _item_position(layouts, key) -> int:
    for run in layouts[0].runs:
        if key in run.keys():
            return run.start
    return -1


POLICIES: dict = {p.name: p for p in (DropPolicy(), DropMediaPolicy(), ShrinkPolicy(), ErrorPolicy())}
assert tuple(POLICIES) == POLICY_NAMES, "errors.POLICY_NAMES lists the policies for the start-up path"
_SHRINKS: dict = {}


def get_policy(name: str, fallback: str | None = None) -> Policy:
    """The policy `name`; for `shrink`, the one whose fallback (below the floor) is `fallback`."""
    try:
        policy = POLICIES[name]
    except KeyError:
        raise VLPatchError(f"unknown policy {name!r}; known: {', '.join(sorted(POLICIES))}") from None
    if name == "shrink" and fallback and fallback != "drop":
        if fallback not in POLICIES or fallback == "shrink":
            raise VLPatchError(f"unknown shrink fallback {fallback!r}; known: drop, drop_media, error")
        policy = _SHRINKS.setdefault(fallback, ShrinkPolicy(POLICIES[fallback]))
    return policy


def settle(layouts: list[Layout]) -> tuple:
    """(plans, left): every layout planned, with the media that leave with a later turn taken out of
    every layout (one media list serves them all)."""
    left: set = set()
    plans = [plan_layout(lay) for lay in layouts]
    while True:
        more = set().union(*(p.left for p in plans)) - left
        if not more:
            return plans, left
        left |= more
        if len(plans) == 1 and not plans[0].partly:
            # one layout whose media left only with later turns dropped whole: planned without them, the
            # turns before come out the same (no run lies in two turns), so the plan is this one
            plans[0].left -= left
            return plans, left
        plans = [plan_layout(lay, left) for lay in layouts]


def fits(layouts: list[Layout]):
    """Plans (each with `.left` set to what leaves) when nothing that must stay is lost, else None."""
    plans, left = settle(layouts)
    if any(p.lost for p in plans):
        return None
    for p in plans:
        p.left = set(left)
    return plans


def resolve(layouts: list[Layout], policy: Policy, sample: str | Callable[[], str], reencode: Callable | None = None) -> Decision:
    """Decide one sample: keep it whole, cut its text, or hand a media overflow to the policy.
    `sample`: how the policy names it, or a function that gives the name (called only for the policy).
    `reencode(scale)`: the sample encoded again with smaller media (see `Resized`), for `shrink`."""
    plans, left = settle(layouts)
    if not any(p.lost for p in plans):
        cut = any(len(p.kept) < lay.length for p, lay in zip(plans, layouts))
        if left:
            return Decision("truncated", [p.kept for p in plans], removed=sorted(left), **because(MEDIA_LEFT_WITH_TURN, _left_detail(layouts, left)))
        return Decision("truncated" if cut else "kept", [p.kept for p in plans])
    case = Overflow(sample() if callable(sample) else sample, layouts, plans, lambda removed: [plan_layout(lay, set(removed) | left) for lay in layouts], reencode, fits)
    decision = policy.resolve(case)
    if decision.resized is not None:
        if decision.removed:
            decision.reason += f"; {MEDIA_LEFT_WITH_TURN}: " + _left_detail(decision.resized.layouts, set(decision.removed))
        return decision
    if left and decision.kept is not None:
        decision.removed = sorted(set(decision.removed) | left)
        decision.reason += f"; {MEDIA_LEFT_WITH_TURN}: " + _left_detail(layouts, left)
    return decision


def too_much_bad(bad: int, total: int, share: float) -> bool:
    """Whether `bad` of `total` samples is more bad input than the share VLPATCH_MAX_BAD allows (then
    training stops before it starts, rather than drop a large part of a dataset)."""
    return bool(total) and bad > share * total


def _left_detail(layouts, left) -> str:
    names = ", ".join(f"{k}#{i}" for k, i in sorted(left))
    return f"{names} left with the part of a later turn that the budget cuts off"


def single_layout(length: int, runs: list[Run], budget: int, first: int | None = None, head: int = 0) -> Layout:
    """A layout with one turn whose source is the whole sequence: cut text from the end.

    `first`: how many media items (in run order) belong to the row's first turn: the row becomes two
    turns, the first ending after those items' runs, so that the media after them leave with the part
    the cut removes (as LLaMA-Factory's turn budget does) and only the first turn's go to the policy.
    `head`: the chat frame the row starts with (`Layout.heads`), kept beside the first turn's media."""

    def split(s, t, c):
        return min(s, c), 0

    if first is None:
        return Layout(length, runs, [(range(0, length), range(length, length))], budget, split, heads=[head])
    cut, seen = 0, 0
    for run in sorted(runs, key=lambda r: r.start):
        if seen >= first:
            break
        seen += len(run.keys())
        cut = run.stop
    turns = [(range(0, cut), range(cut, cut)), (range(cut, length), range(length, length))]
    return Layout(length, runs, turns, budget, split, heads=[head, 0])


def fit_sequence(length: int, runs: list[Run], budget: int, policy: Policy, sample: str, keep: str = "head") -> Decision:
    """One flat sequence (a collator row): keep the head (right truncation) or the tail (left)."""
    return fit_rows([(length, runs)], budget, policy, sample, keep)


def _mirror(length: int, runs: list[Run]) -> list[Run]:
    return [Run(r.kind, length - r.stop, length - r.start, r.first, r.items, r.members) for r in runs]


def fit_rows(rows: list, budget: int, policy: Policy, sample: str, keep: str = "head", reencode: Callable | None = None,
             first: int | None = None, heads: list | None = None) -> Decision:
    """The flat rows of one sample ([(length, runs)]: a collator row, or a preference pair's chosen and
    rejected rows, decided as one), each kept at its head (right truncation) or tail (left).
    `reencode(scale)`: (rows, sizes, floor, payload) of the sample collated again with its media at
    `scale` of their pixels (see `Resized`), or an iterable of such alternatives (the first that fits
    is taken), or None; for policy `shrink`. `first`: the media items of
    the first turn (head only; see `single_layout`): later ones leave with the part the cut removes.
    `heads`: per row, the chat frame it starts with (head only: a cut that keeps the tail loses the
    start, as upstream's does)."""
    first = first if keep == "head" else None
    heads = list(heads or []) if keep == "head" else []

    def layouts(rows_):
        return [single_layout(n, runs if keep == "head" else _mirror(n, runs), budget, first, heads[i] if i < len(heads) else 0)
                for i, (n, runs) in enumerate(rows_)]

    again = None
    if reencode is not None:

        def again(scale):
            got = reencode(scale)
            if got is None:
                return None
            tries = [got] if isinstance(got, tuple) else got  # alternatives, encoded lazily: the first that fits
            return first_fitting(Resized(scale, layouts(rows_), sizes, floor, payload) for rows_, sizes, floor, payload in tries)

    decision = resolve(layouts(rows), policy, sample, again)
    if decision.kept is not None and keep != "head":
        lengths = [lay.length for lay in (decision.resized.layouts if decision.resized else layouts(rows))]
        decision.kept = [sorted(n - 1 - p for p in kept) for n, kept in zip(lengths, decision.kept)]
    return decision


# --------------------------------------------------------------------------- text helpers


def media_first(text: str, placeholders: Iterable[str] = PLACEHOLDERS.values()) -> str:
    """Move every media placeholder of a message to its start, keeping their order (opt-in)."""
    found = []
    rest = text
    for ph in placeholders:
        found.extend((m, ph) for m in _find_all(text, ph))
    if not found:
        return text
    for _, ph in found:
        rest = rest.replace(ph, "", 1)
    ordered = "".join(ph for _, ph in sorted(found))
    return ordered + rest.lstrip("\n ") if rest.strip() else ordered


def _find_all(text: str, sub: str) -> list[int]:
    out, i = [], text.find(sub)
    while i != -1:
        out.append(i)
        i = text.find(sub, i + len(sub))
    return out
