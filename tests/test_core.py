"""Property tests of the pure truncation core (no upstream needed)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlpatch import core

START, IMG, END, VID = 1, 2, 3, 4
TEXT = list(range(10, 40))
KINDS = [core.MediaKind("image", frozenset({IMG}), START, END), core.MediaKind("video", frozenset({VID}), START, END)]
FINDER = core.RunFinder(KINDS)


def lf_split(source_len, target_len, cutoff_len):
    """LLaMA-Factory's infer_seqlen arithmetic, as the trainer-supplied split of a layout."""
    if target_len * 2 < cutoff_len:
        max_target_len = cutoff_len
    elif source_len * 2 < cutoff_len:
        max_target_len = cutoff_len - source_len
    else:
        max_target_len = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target_len = min(max_target_len, target_len)
    max_source_len = max(cutoff_len - new_target_len, 0)
    return min(max_source_len, source_len), new_target_len


@st.composite
def segments(draw, media=True):
    """A token segment: text pieces with whole media runs in between."""
    ids = []
    for _ in range(draw(st.integers(0, 4))):
        ids += draw(st.lists(st.sampled_from(TEXT), max_size=12))
        if media and draw(st.booleans()):
            body = VID if draw(st.integers(0, 3)) == 0 else IMG
            ids += [START] + [body] * draw(st.integers(1, 10)) + [END]
    return ids


def assemble(prefix: list, turns: list) -> tuple:
    """(ids, (source, target) ranges per turn, runs with their items) of a prefix and (source, target) turns."""
    ids, ranges = list(prefix), []
    for src, tgt in turns:
        ranges.append((range(len(ids), len(ids) + len(src)), range(len(ids) + len(src), len(ids) + len(src) + len(tgt))))
        ids += src + tgt
    runs = FINDER.find(ids)
    counts = {"image": sum(r.kind == "image" for r in runs), "video": sum(r.kind == "video" for r in runs)}
    return ids, ranges, FINDER.assign_items(ids, runs, counts)


@st.composite
def samples(draw):
    prefix = draw(st.lists(st.sampled_from(TEXT), max_size=3))
    turns = [(draw(segments()), draw(segments(media=draw(st.booleans())))) for _ in range(draw(st.integers(1, 3)))]
    ids, ranges, runs = assemble(prefix, turns)
    budget = draw(st.integers(max(1, len(prefix)), max(1, len(ids) + 5)))  # the fixed prefix is never cut
    return ids, core.Layout(len(ids), runs, ranges, budget, lf_split, reserved=len(prefix))


def vanilla(ids, layout):
    """What LLaMA-Factory itself keeps: per turn, infer_seqlen then head slices (positions)."""
    kept = list(range(layout.reserved))
    total = layout.reserved
    for src, tgt in layout.turns:
        if total >= layout.budget:
            break
        s, t = lf_split(len(src), len(tgt), layout.budget - total)
        kept += list(src)[:s] + list(tgt)[:t]
        total += s + t
    return kept


def check_invariants(ids, layout, decision):
    if decision.action == "dropped":
        assert decision.kept is None
        return
    kept = decision.kept[0]
    assert kept == sorted(set(kept)), "positions increasing: labels stay aligned"
    assert len(kept) <= layout.budget
    keep = set(kept)
    removed = set(decision.removed)
    for run in layout.runs:
        inside = [p in keep for p in range(run.start, run.stop)]
        assert all(inside) or not any(inside), f"run {run} split"
        gone = not any(inside)
        assert gone == any(k in removed for k in run.keys()), "media list consistent with runs"


@settings(max_examples=400, deadline=None)
@given(samples(), st.sampled_from(["drop", "drop_media"]))
def test_invariants(sample, policy):
    ids, layout = sample
    decision = core.resolve([layout], core.get_policy(policy), "s[0]")
    check_invariants(ids, layout, decision)
    if policy == "drop_media":
        assert decision.action != "dropped"


@settings(max_examples=400, deadline=None)
@given(samples())
def test_same_as_upstream_when_upstream_keeps_media_whole(sample):
    ids, layout = sample
    ref = vanilla(ids, layout)
    ref_set = set(ref)
    splits_media = any(0 < sum(p in ref_set for p in range(r.start, r.stop)) < r.length for r in layout.runs)
    drops_media = any(not any(p in ref_set for p in range(r.start, r.stop)) for r in layout.runs)
    decision = core.resolve([layout], core.get_policy("drop"), "s[0]")
    if not splits_media and not drops_media:
        assert decision.kept[0] == ref


@settings(max_examples=200, deadline=None)
@given(samples())
def test_error_policy_raises_naming_the_sample(sample):
    ids, layout = sample
    try:
        decision = core.resolve([layout], core.get_policy("error"), "mydata[7]")
    except core.SampleError as exc:
        assert "mydata[7]" in str(exc)
    else:
        check_invariants(ids, layout, decision)
        assert decision.action in ("kept", "truncated")


FRAME = list(range(40, 48))  # a chat frame (template prefix, system block, user header): tokens no content has


@st.composite
def framed_samples(draw):
    """A sample whose first turn's source starts with a chat frame (`Layout.heads`), later turns without."""
    frame = FRAME[: draw(st.integers(1, len(FRAME)))]
    turns = [(frame + draw(segments()), draw(segments(media=False)))]
    turns += [(draw(segments()), draw(segments(media=False))) for _ in range(draw(st.integers(0, 2)))]
    ids, ranges, runs = assemble([], turns)
    budget = draw(st.integers(1, len(ids) + 5))
    heads = [len(frame)] + [0] * (len(turns) - 1)
    return ids, core.Layout(len(ids), runs, ranges, budget, lf_split, heads=heads), len(frame)


@settings(max_examples=400, deadline=None)
@given(framed_samples(), st.sampled_from(["drop", "drop_media"]))
def test_a_cut_row_keeps_the_chat_frame_beside_its_first_turns_media(sample, policy):
    """Never a row that starts with an image run and no frame: where a cut row keeps any media of its
    first turn, it keeps that turn's whole frame and at least one token of its answer; the policy decides
    where frame, media and that token do not fit together. Text alone is cut as the trainer cuts it."""
    ids, layout, n_frame = sample
    decision = core.resolve([layout], core.get_policy(policy), "s[0]")
    check_invariants(ids, layout, decision)
    if decision.kept is None:
        return
    keep = set(decision.kept[0])
    src, tgt = layout.turns[0]
    media_kept = any(r.start in src and r.start in keep for r in layout.runs)
    if media_kept and len(ids) > layout.budget:
        assert all(p in keep for p in range(src.start, src.start + n_frame)), "the frame of the first turn stays"
        assert not len(tgt) or any(p in keep for p in tgt), "the answer keeps at least one token"
    if not layout.runs:
        assert decision.kept[0] == vanilla(ids, layout), "text alone: the trainer's own cut"


def test_media_that_take_the_prompts_share_leave_the_frame_in_place():
    # frame (4) + 6 words + an image run of 10: the trainer's split gives the source 16 of 20 tokens
    ids = FRAME[:4] + TEXT[:6] + [START] + [IMG] * 8 + [END] + TEXT[:8]
    runs = FINDER.assign_items(ids, FINDER.find(ids), {"image": 1})
    src, tgt = range(0, 20), range(20, 28)
    without = core.Layout(len(ids), runs, [(src, tgt)], 16, lf_split)
    framed = core.Layout(len(ids), runs, [(src, tgt)], 16, lf_split, heads=[4])
    old = [ids[p] for p in core.resolve([without], core.get_policy("drop"), "x").kept[0]]
    new = [ids[p] for p in core.resolve([framed], core.get_policy("drop"), "x").kept[0]]
    assert old == FRAME[:2] + [START] + [IMG] * 8 + [END] + TEXT[:4]  # without a frame known: half of it went
    assert new == FRAME[:4] + [START] + [IMG] * 8 + [END] + TEXT[:2]
    # frame, image and one token of the answer need 15: within 14 the policy decides
    tight = core.Layout(len(ids), runs, [(src, tgt)], 14, lf_split, heads=[4])
    assert core.resolve([tight], core.get_policy("drop"), "x").action == "dropped"
    unframed = core.Layout(len(ids), runs, [(src, tgt)], 14, lf_split)
    assert [ids[p] for p in core.resolve([unframed], core.get_policy("drop"), "x").kept[0]] == [START] + [IMG] * 8 + [END] + TEXT[:4]


@given(st.integers(0, 600), st.integers(0, 600), st.integers(1, 600))
def test_seqlen_split_is_llamafactorys_arithmetic(source, target, cutoff):
    """`core.seqlen_split` (ms-swift's split) is LLaMA-Factory's `infer_seqlen`, the reference here."""
    assert core.seqlen_split(source, target, cutoff) == lf_split(source, target, cutoff)


def test_an_assistant_header_at_the_answers_head_stays_with_at_least_one_answer_token():
    """`Layout.tails`: the header counted to the answer side (ms-swift) is kept before the answer, and the
    answer floor counts on top of it: frame, media, header and one answer token, or the policy."""
    header = [48, 49, 50]
    ids = FRAME[:4] + TEXT[:6] + [START] + [IMG] * 8 + [END] + header + TEXT[:8]
    runs = FINDER.assign_items(ids, FINDER.find(ids), {"image": 1})
    src, tgt = range(0, 20), range(20, 31)
    layout = core.Layout(len(ids), runs, [(src, tgt)], 19, core.seqlen_split, heads=[4], tails=[3])
    kept = [ids[p] for p in core.resolve([layout], core.get_policy("drop"), "x").kept[0]]
    assert kept == FRAME[:4] + [START] + [IMG] * 8 + [END] + header + TEXT[:2]
    tight = core.Layout(len(ids), runs, [(src, tgt)], 17, core.seqlen_split, heads=[4], tails=[3])
    assert core.resolve([tight], core.get_policy("drop"), "x").action == "dropped"  # header alone: no answer token
    assert core.resolve([core.Layout(len(ids), runs, [(src, tgt)], 18, core.seqlen_split, heads=[4], tails=[3])],
                        core.get_policy("drop"), "x").action == "truncated"


def test_text_first_cut_is_moved_off_the_image():
    # 20 text tokens then an image run of 12: a budget of 25 cuts inside the run upstream
    ids = TEXT[:20] + [START] + [IMG] * 10 + [END] + [TEXT[0]] * 3
    runs = FINDER.assign_items(ids, FINDER.find(ids), {"image": 1})
    layout = core.single_layout(len(ids), runs, 25)
    d = core.resolve([layout], core.get_policy("drop"), "x")
    assert d.action == "truncated"
    kept = [ids[p] for p in d.kept[0]]
    assert kept == TEXT[:13] + [START] + [IMG] * 10 + [END]


def test_media_that_alone_exceed_the_budget():
    ids = TEXT[:3] + [START, IMG, IMG, END] + TEXT[:2] + [START, IMG, IMG, IMG, END]
    runs = FINDER.assign_items(ids, FINDER.find(ids), {"image": 2})
    layout = core.single_layout(len(ids), runs, 8)
    assert core.resolve([layout], core.get_policy("drop"), "x").action == "dropped"
    d = core.resolve([layout], core.get_policy("drop_media"), "x")
    assert d.action == "media_dropped" and d.removed == [("image", 1)]
    assert [ids[p] for p in d.kept[0]] == TEXT[:3] + [START, IMG, IMG, END] + TEXT[:1]
    with pytest.raises(core.SampleError, match=r"sample x: media do not fit"):
        core.resolve([layout], core.get_policy("error"), "x")


def test_placeholder_count_mismatch_is_an_error():
    ids = TEXT[:3] + [START, IMG, END]
    with pytest.raises(ValueError, match=r"1 image token run\(s\) in the text but 2 image\(s\) given"):
        FINDER.assign_items(ids, FINDER.find(ids), {"image": 2})


def test_adjacent_body_only_items_are_told_apart():
    llava = core.RunFinder([core.MediaKind("image", frozenset({IMG}))])
    ids = TEXT[:2] + [IMG] * 8 + TEXT[:1]
    runs = llava.assign_items(ids, llava.find(ids), {"image": 2})
    assert [(r.first, r.items) for r in runs] == [(0, 2)]
    mllama = core.RunFinder([core.MediaKind("image", frozenset({IMG}), item_tokens=1)])
    runs = mllama.assign_items([IMG, IMG, 11, IMG], mllama.find([IMG, IMG, 11, IMG]), {"image": 3})
    assert [(r.first, r.items) for r in runs] == [(0, 2), (2, 1)]
    # a collator knows only the tokens: item_tokens tells adjacent items apart, other layouts count runs
    assert mllama.count_items([IMG, IMG, 11, IMG], mllama.find([IMG, IMG, 11, IMG])) == {"image": 3}
    assert llava.count_items(ids, llava.find(ids)) == {"image": 1}


def test_pixtral_rows_and_end_token():
    BRK, IEND = 5, 6
    pixtral = core.RunFinder([core.MediaKind("image", frozenset({IMG, BRK}), end=IEND)])
    ids = [11, IMG, IMG, BRK, IMG, IMG, IEND, 12]
    assert [(r.start, r.stop) for r in pixtral.find(ids)] == [(1, 7)]


def test_media_first_moves_placeholders_in_order():
    assert core.media_first("Look at this long text <image> and <video> then") == "<image><video>Look at this long text  and  then"
    assert core.media_first("no media") == "no media"


@settings(max_examples=200, deadline=None)
@given(samples(), st.sampled_from(["head", "tail"]), st.sampled_from(["drop", "drop_media"]))
def test_fit_sequence_either_side(sample, keep, policy):
    ids, layout = sample
    decision = core.fit_sequence(len(ids), layout.runs, layout.budget, core.get_policy(policy), "row 0", keep=keep)
    flat = core.Layout(len(ids), layout.runs, [], layout.budget, lf_split)
    check_invariants(ids, flat, decision)
    if decision.kept is not None:
        in_runs = {p for r in layout.runs for p in range(r.start, r.stop)}
        text = [p for p in range(len(ids)) if p not in in_runs]
        kept_text = [p for p in decision.kept[0] if p not in in_runs]
        expect = text[len(text) - len(kept_text):] if keep == "tail" else text[: len(kept_text)]
        assert kept_text == expect, "the text kept is the end (left truncation) or the start (right)"


# --------------------------------------------------------------------------- learned spans

TS = [20, 21, 22]  # a timestamp's text tokens ("<0.5 seconds>")


def _video(frames, pads=3):
    """A Qwen3-VL-like video: per frame group a timestamp, then START pads END."""
    out = []
    for _ in range(frames):
        out += TS + [START] + [VID] * pads + [END]
    return out


@given(st.lists(st.sampled_from(TEXT), max_size=8), st.lists(st.sampled_from(TEXT), max_size=8), st.integers(1, 3))
def test_locate_finds_each_expansion_whole_with_its_text(before, between, frames):
    marks = frozenset({START, END, VID, IMG})
    first, second = tuple(_video(frames)), tuple([START] + [IMG] * 4 + [END])
    ids = before + list(first) + between + list(second) + [11]
    exps = [core.Expansion((("video", 0),), first, marks), core.Expansion((("image", 0),), second, marks)]
    runs = core.locate(ids, exps)
    assert [ids[r.start : r.stop] for r in runs] == [list(first), list(second)]
    assert [r.keys() for r in runs] == [[("video", 0)], [("image", 0)]]
    assert core.stray_marks(ids, runs, marks) == 0


def test_locate_keeps_only_the_text_that_tokenized_alike():
    """A leading timestamp merged with the text before it in context: the span starts at the core."""
    marks = frozenset({START, END, VID})
    exp = core.Expansion((("video", 0),), tuple(_video(1)), marks)
    ids = [10, 99, 21, 22] + [START, VID, VID, VID, END]  # 99: "text<0" merged into one token
    (run,) = core.locate(ids, [exp])
    assert (run.start, run.stop) == (2, 9)


def test_shared_span_and_missing_core():
    marks = frozenset({START, END, VID, 5})
    both = core.Expansion((("video", 0), ("audio", 0)), (START, VID, 5, VID, 5, END), marks)
    (run,) = core.locate([10, START, VID, 5, VID, 5, END], [both])
    assert run.keys() == [("video", 0), ("audio", 0)]
    with pytest.raises(ValueError, match="video #0"):
        core.locate([10, START, VID, END], [both])


def test_stray_marks_counts_tokens_no_span_holds():
    marks = frozenset({START, END, IMG})
    exp = core.Expansion((("image", 0),), (START, IMG, END), marks)
    ids = [START, IMG, END, 10, START, IMG, END]  # a second run the plugin wrote outside any placeholder
    runs = core.locate(ids, [exp])
    assert core.stray_marks(ids, runs, marks) == 3


def test_drop_media_removes_every_item_of_a_shared_span():
    """A Qwen2.5-Omni video holding its own audio: one span, two items; both leave together."""
    runs = [core.Run("video", 2, 12, 0, 1, (("video", 0), ("audio", 0))), core.Run("video", 14, 24, 1, 1, (("video", 1), ("audio", 1)))]
    decision = core.fit_sequence(26, runs, 16, core.get_policy("drop_media"), "s")
    assert decision.action == "media_dropped"
    assert sorted(decision.removed) == [("audio", 1), ("video", 1)]
    assert list(range(2, 12)) == [p for p in decision.kept[0] if 2 <= p < 12]


@settings(max_examples=400, deadline=None)
@given(samples())
def test_a_sample_is_dropped_only_when_its_first_turns_media_cannot_fit(sample):
    """Media of later turns leave with the part the budget cuts off (the sample stays, `truncated`, those
    items removed and named); only the media of the turn budgeted first go to the policy."""
    ids, layout = sample
    src, tgt = layout.turns[0]
    first = sum(r.length for r in layout.runs if r.start in src or r.start in tgt)
    decision = core.resolve([layout], core.get_policy("drop"), "s[0]")
    check_invariants(ids, layout, decision)
    if first <= layout.budget - layout.reserved:
        assert decision.action != "dropped", decision.reason
    for kind, k in decision.removed:
        run = next(r for r in layout.runs if (kind, k) in r.keys())
        assert not (run.start in src or run.start in tgt), "a first-turn item is never removed under drop"
        assert "media_left_with_turn" in decision.reason


def test_a_later_turns_image_leaves_with_its_turn():
    """Issue 13's example: turn 1 (with its image) fits, turn 2's image does not fit in what is left."""
    t1 = [10] * 20 + [START] + [IMG] * 30 + [END] + [11] * 5
    t2 = [12] * 10 + [START] + [IMG] * 30 + [END] + [13] * 5
    ids = t1 + t2
    runs = FINDER.assign_items(ids, FINDER.find(ids), {"image": 2})
    n1, s1 = len(t1), len(t1) - 5
    s2 = n1 + len(t2) - 5
    layout = core.Layout(len(ids), runs, [(range(0, s1), range(s1, n1)), (range(n1, s2), range(s2, len(ids)))], 80, lf_split)
    decision = core.resolve([layout], core.get_policy("drop"), "s[0]")
    assert decision.action == "truncated" and decision.removed == [("image", 1)]
    assert decision.reason.startswith("media_left_with_turn: image#1")
    assert all(p in decision.kept[0] for p in range(runs[0].start, runs[0].stop))


def test_relength_is_the_layout_of_the_sample_with_shorter_runs():
    """core.relength (the shrink search's prediction) equals the layout found on the re-encoded ids."""

    def sample(n1, n2):
        t1 = [10] * 20 + [START] + [IMG] * n1 + [END] + [11] * 5
        t2 = [12] * 10 + [START] + [IMG] * n2 + [END] + [13] * 5
        ids = t1 + t2
        runs = FINDER.assign_items(ids, FINDER.find(ids), {"image": 2})
        s1, n = len(t1) - 5, len(t1)
        turns = [(range(0, s1), range(s1, n)), (range(n, len(ids) - 5), range(len(ids) - 5, len(ids)))]
        return core.Layout(len(ids), runs, turns, 80, lf_split)

    assert core.relength(sample(30, 30), {("image", 0): -12, ("image", 1): 4}) == sample(18, 34)
    assert core.relength(sample(30, 30), {("image", 1): -29}) == sample(30, 1)
    outside = sample(30, 30)
    outside.turns = outside.turns[1:]  # the first run is outside every turn (a prefix)
    assert core.relength(outside, {("image", 0): -5}) is None


# ----------------------------------------------------------------------------- policy shrink


class FakeImages:
    """A sample whose one image has `tokens(scale)` body tokens: what an integration's reencode gives."""

    def __init__(self, text_before, text_after, tokens, budget, floor_scale=0.0):
        self.text_before, self.text_after, self.tokens, self.budget = text_before, text_after, tokens, budget
        self.floor_scale = floor_scale
        self.calls = []

    def layout(self, scale=1.0):
        n = self.tokens(scale)
        ids = [10] * self.text_before + [START] + [IMG] * n + [END] + [11] * self.text_after
        runs = FINDER.assign_items(ids, FINDER.find(ids), {"image": 1})
        return core.Layout(len(ids), runs, [(range(0, len(ids) - self.text_after), range(len(ids) - self.text_after, len(ids)))],
                           self.budget, lf_split)

    def reencode(self, scale):
        self.calls.append(scale)
        scale = max(scale, self.floor_scale)
        return core.Resized(scale, [self.layout(scale)], [(("image", 0), (100, 100), (int(100 * scale ** 0.5),) * 2)],
                            scale <= self.floor_scale)


def test_shrink_finds_the_largest_scale_that_fits():
    # tokens follow the area in steps of 4 (a processor's rounding); 400 tokens at full size, budget 100
    fake = FakeImages(30, 5, lambda s: max(4, int(400 * s) // 4 * 4), 100)
    decision = core.resolve([fake.layout()], core.get_policy("shrink"), "s[0]", fake.reencode)
    assert decision.action == "shrunk" and decision.reason.startswith("media_shrunk: "), decision
    assert len(decision.kept[0]) <= 100
    fits = [s for s in fake.calls if fake.tokens(s) + 2 <= 100]
    chosen = decision.resized.scale
    assert chosen == max(fits)
    assert fake.tokens(chosen * core.SHRINK_PRECISION ** 2) + 2 > 100 or fake.tokens(chosen * core.SHRINK_PRECISION ** 2) == fake.tokens(chosen), (
        "within the search's precision of the largest size that fits")
    assert len(fake.calls) <= core.SHRINK_STEPS
    layout = decision.resized.layouts[0]
    check_invariants(None, layout, decision)


def test_shrink_below_the_floor_falls_back():
    fake = FakeImages(30, 5, lambda s: max(4, int(400 * s)), 100, floor_scale=0.5)
    decision = core.resolve([fake.layout()], core.get_policy("shrink"), "s[0]", fake.reencode)
    assert decision.action == "dropped" and "shrink_failed: it does not fit even with its media at the floor" in decision.reason
    decision = core.resolve([fake.layout()], core.get_policy("shrink", "drop_media"), "s[0]", fake.reencode)
    assert decision.action == "media_dropped" and decision.removed == [("image", 0)]
    with pytest.raises(core.SampleError, match="media do not fit"):
        core.resolve([fake.layout()], core.get_policy("shrink", "error"), "s[0]", fake.reencode)


def test_shrink_with_nothing_to_downsize_falls_back_and_says_why():
    fake = FakeImages(30, 5, lambda s: 400, 100)

    def reencode(scale):
        raise core.ShrinkUnavailable("nothing that must stay can be downsized here (audio)")

    decision = core.resolve([fake.layout()], core.get_policy("shrink"), "s[0]", reencode)
    assert decision.action == "dropped" and decision.reason.endswith("shrink_unavailable: nothing that must stay can be downsized here (audio)"), decision.reason
    decision = core.resolve([fake.layout()], core.get_policy("shrink", "drop_media"), "s[0]", reencode)
    assert decision.action == "media_dropped" and "shrink_unavailable" in decision.reason


def test_shrink_without_reencode_falls_back_and_says_why():
    fake = FakeImages(30, 5, lambda s: 400, 100)
    decision = core.resolve([fake.layout()], core.get_policy("shrink"), "s[0]")
    assert decision.action == "dropped" and "shrink_unavailable" in decision.reason


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 60), st.integers(0, 20), st.integers(20, 900), st.integers(30, 200), st.sampled_from([1, 4, 16]))
def test_shrink_invariants(before, after, full, budget, step):
    fake = FakeImages(before, after, lambda s: max(step, int(full * s) // step * step), budget, floor_scale=0.01)
    layout = fake.layout()
    decision = core.resolve([layout], core.get_policy("shrink"), "s[0]", fake.reencode)
    if decision.action == "shrunk":
        check_invariants(None, decision.resized.layouts[0], decision)
        assert fake.tokens(decision.resized.scale) <= full
    elif decision.action == "dropped":
        assert fake.tokens(0.01) + 2 > budget or len(fake.calls) == core.SHRINK_STEPS, (fake.calls, decision.reason)
    else:
        assert decision.action in ("kept", "truncated") and fake.calls == []
        check_invariants(None, layout, decision)


@settings(max_examples=300, deadline=None)
@given(segments(), st.integers(0, 4), st.integers(5, 80))
def test_a_row_keeps_its_first_turns_media_and_later_ones_leave_with_the_cut(ids, first, budget):
    """A collator row (`fit_rows(first=...)`): dropped only when the first turn's media alone exceed the
    budget; every removed item comes after the first turn's; kept rows within budget, runs whole."""
    runs = FINDER.find(ids)
    counts = {"image": sum(r.kind == "image" for r in runs), "video": sum(r.kind == "video" for r in runs)}
    runs = FINDER.assign_items(ids, runs, counts)
    first = min(first, len(runs))
    decision = core.fit_rows([(len(ids), runs)], budget, core.get_policy("drop"), "row 0", first=first)
    order = sorted(runs, key=lambda r: r.start)
    first_keys = {k for r in order[:first] for k in r.keys()}
    need = sum(r.length for r in order[:first])
    if decision.action == "dropped":
        assert need > budget, (need, budget)
        return
    assert need <= budget or not first
    layout = core.single_layout(len(ids), runs, budget, first)
    check_invariants(ids, layout, decision)
    assert not set(decision.removed) & first_keys, decision


def test_shrink_item_takes_pixels_then_frames():
    """A video's candidates: pixels down to the floor with every frame, then fewer frames at the floor;
    an image only pixels; nothing changes at scale 1 or for an item at its floor already."""
    video = core.ShrinkItem((224, 224), (448, 448), 56 * 56, frames=16, min_frames=4)
    assert video.candidate(1.0) is None
    (w, h, n), floor = video.candidate(0.25)
    assert (w, h, n, floor) == (112, 112, 16, False), "a quarter of the pixels, every frame"
    (w, h, n), floor = video.candidate(0.0625 / 2)
    assert w * h == 56 * 56 and n == 8 and not floor, "at the pixels floor: half the frames"
    (w, h, n), floor = video.candidate(0.001)
    assert (w, h, n, floor) == (56, 56, 4, True), "both floors"
    assert video.before() == (448, 448, 16)
    assert video.sharp((56, 56, 8)) == (224, 224, 8) and video.sharp((112, 112, 16)) == (112, 112, 16)
    image = core.ShrinkItem((300, 200), (300, 200), 100 * 100)
    (size, floor) = image.candidate(0.5)
    assert size == (212, 141) and not floor
    assert core.ShrinkItem((50, 50), (50, 50), 100 * 100).candidate(0.1) is None, "below the floor already: as it came"


def test_shrink_candidates_offer_the_sharp_video_first():
    items = {("image", 0): core.ShrinkItem((100, 100), (100, 100), 50 * 50),
             ("video", 0): core.ShrinkItem((64, 64), (64, 64), 32 * 32, frames=8, min_frames=2)}
    changed, floor, sharp = core.shrink_candidates(items, 0.1)
    assert [k for k, _, _ in changed] == [("image", 0), ("video", 0)] and not floor
    assert dict((k, a) for k, _, a in sharp)[("video", 0)] == (64, 64, dict((k, a) for k, _, a in changed)[("video", 0)][2])
    assert core.shrink_candidates(items, 0.5)[2] is None, "no frames lost: nothing to sharpen"


def test_pick_frames_spreads_over_the_clip():
    assert core.pick_frames(16, 4) == [0, 5, 10, 15]
    assert core.pick_frames(16, 1) == [0] and core.pick_frames(3, 8) == [0, 1, 2]
    assert len(core.pick_frames(128, 5)) == 5
