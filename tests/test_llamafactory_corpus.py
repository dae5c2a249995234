"""The real `llamafactory.data.get_dataset` (as training calls it) on a generated multi-turn corpus.

The corpus (fixed seed; tests/fixtures/sharegpt_corpus.py): 500 sharegpt samples (250 on the older releases, VLPATCH_CORPUS_SAMPLES) of 1-4 user / assistant turn pairs with 0-6 images in
all, each `<image>` anywhere in a random user turn, user texts of 0-150 words and assistant texts of
1-80, half of them with a system prompt of their own (3-40 words; the others the template's default),
images one PNG file each in 8 sizes (image runs of 6 to 258 tokens); uncut, the samples are
43-1102 tokens long (median ~400). Samples with images are one dataset, text-only samples another
(LLaMA-Factory 0.9.2 fails on empty image lists); training merges them, so the merged order is the
image samples, then the text-only ones.

Every case preprocesses every sample with vlpatch applied: cutoff_len 128, 256 and 384, each with
`mask_history` off and on, under policy `drop`; and cutoff_len 128 under `drop_media`. The reference
is vanilla `get_dataset` (vlpatch reverted) at an unbounded cutoff_len with the same `mask_history`:
the uncut encoding of every sample. From it the test works out on its own (no vlpatch planning code)
the tokens of each image's run and which samples must go: exactly those whose first-budgeted turn
(the first turn; the last one under `mask_history`) holds more image tokens than cutoff_len. Output
rows are mapped back to samples by order (the merged order, less the samples the report drops; the
report rows' dataset / file row are checked against the corpus). Per sample:

* `drop`: dropped exactly when the first-budgeted turn's media do not fit; otherwise every image of
  that turn kept, and images that leave come from later turns only, named in the report row
  (`media_removed`, reason `media_left_with_turn`), or the reason is `text_over_budget`;
* `drop_media`: nothing dropped; a sample whose first-budgeted turn overflows keeps the longest
  prefix of that turn's images that fits (`media_dropped`), every other sample's row is the same as
  under `drop`;
* rows at most cutoff_len long, labels and attention mask as long as input_ids, every
  `<|vision_start|> <|image_pad|>* <|vision_end|>` run whole, as many runs as images, each run as long
  as the uncut run of the image it stands for (sizes differ, so the right images went), the
  (input_id, label) pairs a subsequence of the uncut ones, the images list the sample's own less
  exactly the reported items;
* samples within cutoff_len exactly as vanilla's and without a report row; every other sample has
  one row;
* the chat frame: a cut row starts with its uncut row's system block and first user header (turn
  order), and a sample goes to the policy exactly when its first-budgeted turn's media, that turn's
  frame and one token of its answer do not fit together (docs/policies.md: what a cut row keeps).

Vanilla at cutoff_len 256 (both `mask_history` settings) also checks that a sample whose image runs
upstream's own cut keeps whole comes out token for token as upstream's. Runs on every tested
LLaMA-Factory release, all cases: 500 samples on the newest, 250 on older ones (which still cover
every case: the first test checks).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass

import pytest

from tests.conftest import require
from tests.fixtures.chat_frame import QWEN_USER_FRAME, common_prefix, qwen_frame
from tests.fixtures.sharegpt_corpus import MAX_PIXELS, N, SIZES, Sample, build_corpus, run_tokens

pytestmark = pytest.mark.llamafactory

CUTOFFS = (128, 256, 384)
SHRINK_FLOOR = 56 * 56  # policy shrink: at this floor every image is at most 10 tokens, six of them fit in 128
UNBOUNDED = 1 << 20
ANSWER_FLOOR = 1  # docs/policies.md: a cut row's answer keeps at least one token beside its frame and media


@pytest.fixture(scope="module")
def corpus_pipeline(tiny_qwen2vl, tmp_path_factory):
    """get_dataset on the corpus: `lf.run(cutoff, mask_history, policy)`; policy None is vanilla."""
    require("llamafactory")
    import torch
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments, ModelArguments
    from llamafactory.model import load_tokenizer
    from transformers import Seq2SeqTrainingArguments

    import vlpatch

    data_dir = str(tmp_path_factory.mktemp("corpus"))
    corpus = build_corpus(data_dir)
    work = tmp_path_factory.mktemp("runs")
    model_args = ModelArguments(model_name_or_path=tiny_qwen2vl, image_max_pixels=MAX_PIXELS)
    tokenizer_module = load_tokenizer(model_args)
    tok = tokenizer_module["tokenizer"]
    cache: dict = {}
    # vanilla runs the image processor on every image: with torch's default thread pool that costs
    # ~8x the CPU time on a shared 2-core machine (threads spin waiting for each other); one thread
    # changes no token (the counts come from the image sizes)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def run(cutoff: int, mask_history: bool, policy: str | None):
        key = (cutoff, mask_history, policy)
        if key in cache:
            return cache[key]
        report_path = str(work / f"report_{cutoff}_{mask_history}_{policy}.jsonl")
        vlpatch.revert()
        if policy == "shrink":
            vlpatch.apply(policy=policy, report=report_path, shrink_min_pixels=SHRINK_FLOOR, shrink_dir=str(work / f"media_{cutoff}_{mask_history}"))
        elif policy:
            vlpatch.apply(policy=policy, report=report_path)
        try:
            data_args = DataArguments(template="qwen2_vl", dataset="corpus_img,corpus_text", dataset_dir=data_dir,
                                      cutoff_len=cutoff, mask_history=mask_history, overwrite_cache=True)
            training_args = Seq2SeqTrainingArguments(output_dir=str(work / "out"), report_to="none", use_cpu=True)
            template = get_template_and_fix_tokenizer(tok, data_args)
            dataset = get_dataset(template, model_args, data_args, training_args, "sft", **tokenizer_module)["train_dataset"]
            rows = [dataset[i] for i in range(len(dataset))]
        finally:
            vlpatch.revert()
        report = []
        if os.path.exists(report_path):
            with open(report_path, encoding="utf-8") as fh:
                report = [json.loads(line) for line in fh if line.strip()]
        cache[key] = rows, report
        return cache[key]

    class LF:
        pass

    out = LF()
    out.run, out.corpus, out.tok, out.references = run, corpus, tok, {}
    out.template = get_template_and_fix_tokenizer(tok, DataArguments(template="qwen2_vl"))
    out.processor = tokenizer_module["processor"]
    out.start, out.pad, out.end = (tok.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"))
    yield out
    vlpatch.revert()
    torch.set_num_threads(threads)


def image_runs(corpus_pipeline, ids) -> list:
    """Lengths of the image runs of `ids`; fails on a split run or a stray vision token."""
    runs, i, n = [], 0, len(ids)
    while i < n:
        tok = ids[i]
        if tok == corpus_pipeline.start:
            j = i + 1
            while j < n and ids[j] == corpus_pipeline.pad:
                j += 1
            assert j > i + 1 and j < n and ids[j] == corpus_pipeline.end, f"image run at {i} is not whole: {ids[i:j + 1][-5:]}"
            runs.append(j + 1 - i)
            i = j + 1
        else:
            assert tok not in (corpus_pipeline.pad, corpus_pipeline.end), f"stray vision token {tok} at {i}"
            i += 1
    return runs


def is_subsequence(part, whole) -> bool:
    it = iter(whole)
    return all(any(x == y for y in it) for x in part)


def first_budgeted(sample: Sample, mask_history: bool) -> int:
    return sample.turns - 1 if mask_history else 0


@dataclass
class Reference:
    """What the uncut vanilla encoding says about one sample."""

    ids: list
    labels: list
    runs: list  # tokens of each image's run, in image order
    first_media: int  # image tokens of the first-budgeted turn
    frame: int = 0  # tokens of the chat frame at the start of the first-budgeted turn
    start: int = 0  # where that turn's source starts

    def must_go(self, cutoff: int) -> bool:
        """Its first-budgeted turn's media, beside that turn's frame and the answer's floor, exceed cutoff."""
        return self.first_media > 0 and self.first_media + self.frame + ANSWER_FLOOR > cutoff


def reference(corpus_pipeline, mask_history: bool) -> list:
    if mask_history in corpus_pipeline.references:
        return corpus_pipeline.references[mask_history]
    rows, report = corpus_pipeline.run(UNBOUNDED, mask_history, None)
    assert not report and len(rows) == len(corpus_pipeline.corpus.samples)
    out = []
    for s, row in zip(corpus_pipeline.corpus.samples, rows):
        runs = image_runs(corpus_pipeline, row["input_ids"])
        assert runs == [run_tokens(size) for size in s.sizes], (s.index, runs, s.sizes)
        assert (row["images"] or []) == s.images
        first = first_budgeted(s, mask_history)
        ids = row["input_ids"]
        # the chat frame a cut row keeps at the start of the first-budgeted turn: the system block and
        # user header of the first turn (the sample's system prompt or the template's default), the user
        # header of a later one
        if first:  # a later turn: its source starts at the last user header
            header = corpus_pipeline.tok.encode(QWEN_USER_FRAME, add_special_tokens=False)
            start = max(i for i in range(len(ids)) if ids[i : i + len(header)] == header)
            frame = common_prefix(ids[start:], header)
        else:
            start, frame = 0, qwen_frame(corpus_pipeline.tok, ids, s.system)
        out.append(Reference(ids, row["labels"], runs, sum(r for r, t in zip(runs, s.turn_of) if t == first), frame, start))
    corpus_pipeline.references[mask_history] = out
    return out


def check_case(corpus_pipeline, cutoff: int, mask_history: bool, policy: str) -> Counter:
    samples = corpus_pipeline.corpus.samples
    ref = reference(corpus_pipeline, mask_history)
    rows, report = corpus_pipeline.run(cutoff, mask_history, policy)
    by_index = {}
    for r in report:
        assert r["index"] not in by_index, f"two report rows for sample {r['index']}"
        s = samples[r["index"]]
        assert (r["source_dataset"], r["source_row"]) == (s.dataset, s.row), r
        by_index[r["index"]] = r
    over = {s.index for s in samples if len(ref[s.index].ids) > cutoff}
    assert set(by_index) == over, "one report row for every sample over the cutoff, none for the others"
    must_go = {s.index for s in samples if ref[s.index].must_go(cutoff)}
    dropped = {i for i, r in by_index.items() if r["action"] == "dropped"}
    if policy == "drop":
        wrong = sorted(dropped - must_go)
        assert not wrong, f"dropped though their first-budgeted turn's media fit beside its frame: {[(i, by_index[i]['reason']) for i in wrong[:5]]}"
        missing = sorted(must_go - dropped)
        assert not missing, f"kept though their first-budgeted turn's media do not fit beside its frame: {missing[:10]}"
        for i in dropped:
            assert by_index[i]["reason"].startswith("media_exceed_budget"), by_index[i]
    else:
        assert not dropped, [by_index[i] for i in sorted(dropped)[:3]]
    kept = [s for s in samples if s.index not in dropped]
    assert len(rows) == len(kept), (len(rows), len(kept))
    counts = Counter()
    for s, row in zip(kept, rows):
        r, u = by_index.get(s.index), ref[s.index]
        where = f"sample {s.index} ({s.dataset}[{s.row}]) at cutoff_len {cutoff}, mask_history {mask_history}, {policy}"
        ids, labels, images = row["input_ids"], row["labels"], row["images"] or []
        assert len(ids) <= cutoff, where
        assert len(labels) == len(ids) == len(row["attention_mask"]), where
        runs = image_runs(corpus_pipeline, ids)
        assert len(runs) == len(images), (where, runs, images)
        assert is_subsequence(images, s.images), (where, images)
        kept_items = [k for k, path in enumerate(s.images) if path in images]
        removed = [k for k in range(len(s.images)) if k not in kept_items]
        assert runs == [u.runs[k] for k in kept_items], (where, runs, u.runs, removed)
        assert is_subsequence(list(zip(ids, labels)), list(zip(u.ids, u.labels))), where
        first = first_budgeted(s, mask_history)
        if r is None:
            assert (ids, labels, images) == (u.ids, u.labels, s.images), where
            counts["kept whole"] += 1
            continue
        if not mask_history:  # a cut row keeps the chat frame its uncut row starts with (system block, header)
            assert ids[: u.frame] == u.ids[: u.frame], (where, r, ids[: u.frame + 3], u.ids[: u.frame + 3])
        assert r["tokens_before"] == len(u.ids) and r["tokens_after"] == len(ids), (where, r)
        answer = sum(1 for x in labels if x != -100)  # the report says how much of the answer gave way
        assert (r["answer_tokens_before"], r["answer_tokens_after"]) == (sum(1 for x in u.labels if x != -100), answer), (where, r)
        assert r["media_removed"].get("image", []) == removed and len(removed) == len(s.images) - len(images), (where, r)
        if s.index in must_go:  # drop_media: the first-budgeted turn's trailing runs go until the rest fits
            assert r["action"] == "media_dropped" and r["reason"].startswith("media_exceed_budget"), (where, r)
            turn_items = [k for k, t in enumerate(s.turn_of) if t == first]
            stay, total = [], 0
            for k in turn_items:
                if total + u.runs[k] + u.frame + ANSWER_FLOOR > cutoff:
                    break
                stay.append(k)
                total += u.runs[k]
            assert [k for k in kept_items if k in turn_items] == stay, (where, r, turn_items, u.runs)
            counts["media_dropped"] += 1
            continue
        assert r["action"] == "truncated", (where, r)
        assert all(s.turn_of[k] != first for k in removed), f"{where}: an image of the first-budgeted turn left: {r}"
        if removed:
            assert r["reason"].startswith("media_left_with_turn"), (where, r)
            counts["truncated, media_left_with_turn"] += 1
        else:
            assert r["reason"] == "text_over_budget", (where, r)
            counts["truncated, text only"] += 1
    counts["dropped"] = len(dropped)
    return counts


def test_the_corpus_covers_every_case(corpus_pipeline):
    samples = corpus_pipeline.corpus.samples
    assert len(samples) == N
    assert {s.turns for s in samples} == {1, 2, 3, 4}
    assert {len(s.images) for s in samples} == set(range(7))
    assert {size for s in samples for size in s.sizes} == set(SIZES)
    assert {t for s in samples for t in s.turn_of} == {0, 1, 2, 3}
    for mask_history in (False, True):
        ref = reference(corpus_pipeline, mask_history)
        for cutoff in CUTOFFS:
            fit = sum(len(u.ids) <= cutoff for u in ref)
            go = sum(u.must_go(cutoff) for u in ref)
            later = sum(len(u.ids) > cutoff and u.first_media < sum(u.runs) for u in ref)
            assert fit >= 10 and len(ref) - fit >= 50 and go >= 1 and later >= 20, (cutoff, mask_history, fit, go, later)
    lengths = sorted(len(u.ids) for u in ref)
    images = sum(len(s.images) for s in samples)
    print(f"{len(samples)} samples ({sum(bool(s.images) for s in samples)} with images, {images} images), "
          f"uncut tokens min {lengths[0]} median {lengths[len(lengths) // 2]} max {lengths[-1]}")


@pytest.mark.parametrize("mask_history", [False, True], ids=["turn_order", "mask_history"])
@pytest.mark.parametrize("cutoff", CUTOFFS)
def test_drop(corpus_pipeline, cutoff, mask_history):
    counts = check_case(corpus_pipeline, cutoff, mask_history, "drop")
    print(f"cutoff_len {cutoff} mask_history {mask_history} drop: {dict(counts)}")
    assert counts["truncated, media_left_with_turn"] and counts["truncated, text only"] and counts["kept whole"]
    assert counts["dropped"]


def test_drop_media(corpus_pipeline):
    counts = check_case(corpus_pipeline, CUTOFFS[0], False, "drop_media")
    print(f"cutoff_len {CUTOFFS[0]} mask_history False drop_media: {dict(counts)}")
    assert counts["media_dropped"] and not counts["dropped"]
    # every sample whose first-budgeted turn fits comes out as under drop
    drop_rows, drop_report = corpus_pipeline.run(CUTOFFS[0], False, "drop")
    media_rows, _ = corpus_pipeline.run(CUTOFFS[0], False, "drop_media")
    dropped = {r["index"] for r in drop_report if r["action"] == "dropped"}
    indices = [s.index for s in corpus_pipeline.corpus.samples]
    assert len(media_rows) == len(indices)
    by_index = dict(zip([i for i in indices if i not in dropped], drop_rows))
    for i, row in zip(indices, media_rows):
        if i in by_index:
            assert row == by_index[i], f"sample {i}"


def collated_image_tokens(corpus_pipeline, rows) -> list:
    """LLaMA-Factory's own collator on the rows, as training runs it (it re-reads every image from the
    row's `images`): the image tokens of each image (grid / merge^2), in order."""
    from llamafactory.data import SFTDataCollatorWith4DAttentionMask

    collator = SFTDataCollatorWith4DAttentionMask(template=corpus_pipeline.template, processor=corpus_pipeline.processor, tokenizer=corpus_pipeline.tok, label_pad_token_id=-100)
    merge = corpus_pipeline.processor.image_processor.merge_size ** 2
    out = []
    for k in range(0, len(rows), 16):
        feats = [{**{key: row[key] for key in ("input_ids", "attention_mask", "labels")}, "images": row["images"] or [],
                  "videos": [], "audios": []} for row in rows[k:k + 16]]
        got = collator(feats)
        out += [int(g.prod()) // merge for g in got["image_grid_thw"]]
    return out


@pytest.mark.parametrize("cutoff,mask_history", [(128, False), (256, True)], ids=["128-turn_order", "256-mask_history"])
def test_shrink(corpus_pipeline, cutoff, mask_history):
    """Policy shrink: nothing is dropped (at the floor every first-budgeted turn fits), the samples that
    drop loses are shrunk, every other sample comes out as under drop, and LLaMA-Factory's own collator,
    reading the images the rows name at their new sizes, gives every image exactly the tokens its run
    holds."""
    from vlpatch.integrations import _media

    samples = corpus_pipeline.corpus.samples
    ref = reference(corpus_pipeline, mask_history)
    rows, report = corpus_pipeline.run(cutoff, mask_history, "shrink")
    drop_rows, drop_report = corpus_pipeline.run(cutoff, mask_history, "drop")
    by_index = {r["index"]: r for r in report}
    dropped_by_drop = {r["index"] for r in drop_report if r["action"] == "dropped"}
    must_go = {s.index for s in samples if ref[s.index].must_go(cutoff)}
    assert dropped_by_drop == must_go and must_go
    assert not [r for r in report if r["action"] == "dropped"], "nothing is dropped: at the floor every sample fits"
    assert len(rows) == len(samples)
    shrunk = {i for i, r in by_index.items() if r["action"] == "shrunk"}
    assert shrunk == must_go, (sorted(shrunk - must_go)[:5], sorted(must_go - shrunk)[:5])
    under_drop = dict(zip([s.index for s in samples if s.index not in dropped_by_drop], drop_rows))
    checked = []
    for s, row in zip(samples, rows):
        where = f"sample {s.index} at cutoff_len {cutoff}, mask_history {mask_history}, shrink"
        if s.index not in shrunk:
            assert row == under_drop[s.index], where
            continue
        r = by_index[s.index]
        ids, images = row["input_ids"], row["images"] or []
        assert len(ids) <= cutoff and len(row["labels"]) == len(ids), where
        runs = image_runs(corpus_pipeline, ids)
        assert len(runs) == len(images) and r["tokens_after"] == len(ids), (where, r)
        assert r["reason"].startswith("media_shrunk: "), (where, r)
        resized = {int(x["item"].split("#")[1]): x for x in r["media_resized"]}
        first = first_budgeted(s, mask_history)
        removed = r["media_removed"].get("image", [])
        kept_items = [k for k in range(len(s.images)) if k not in removed]
        assert all(s.turn_of[k] != first for k in removed), (where, r)
        assert set(resized) <= {k for k in kept_items if s.turn_of[k] == first}, (where, r)
        for j, k in enumerate(kept_items):
            if k in resized:
                x = resized[k]
                assert images[j] == x["sized_entry"] and _media.unmark(images[j]) == (s.images[k], tuple(x["after"])), (where, images[j])
                assert x["before"] == list(s.sizes[k]), (where, x)
                assert x["after"][0] * x["after"][1] >= min(SHRINK_FLOOR, s.sizes[k][0] * s.sizes[k][1]) - x["after"][0] - x["after"][1]
                assert runs[j] == x["tokens_after"] < x["tokens_before"] == run_tokens(s.sizes[k]), (where, x, runs)
            else:
                assert images[j] == s.images[k] and runs[j] == run_tokens(s.sizes[k]), (where, j, k)
        checked.append((row, runs))
    # the real collator on every shrunk row, with vlpatch on as in training: features == tokens, image by image
    import tempfile

    import vlpatch

    with tempfile.TemporaryDirectory() as scratch:
        vlpatch.apply(report=os.path.join(scratch, "collate.jsonl"))
        try:
            got = collated_image_tokens(corpus_pipeline, [row for row, _ in checked])
        finally:
            vlpatch.revert()
    assert got == [n - 2 for _, runs in checked for n in runs]
    print(f"cutoff_len {cutoff} mask_history {mask_history} shrink: {len(shrunk)} shrunk (drop loses them), 0 dropped, "
          f"{sum(len(runs) for _, runs in checked)} images through the real collator")


@pytest.mark.parametrize("mask_history", [False, True], ids=["turn_order", "mask_history"])
def test_upstream_cut_that_keeps_runs_whole_is_unchanged(corpus_pipeline, mask_history):
    """Where vanilla's own cut at the same cutoff_len keeps every image run whole (and every image),
    vlpatch's row is vanilla's, token for token."""
    cutoff = CUTOFFS[1]
    vanilla, _ = corpus_pipeline.run(cutoff, mask_history, None)
    patched, report = corpus_pipeline.run(cutoff, mask_history, "drop")
    assert len(vanilla) == len(corpus_pipeline.corpus.samples)
    dropped = {r["index"] for r in report if r["action"] == "dropped"}
    ours = dict(zip([s.index for s in corpus_pipeline.corpus.samples if s.index not in dropped], patched))
    same = cut = 0
    for s, row in zip(corpus_pipeline.corpus.samples, vanilla):
        try:
            runs = image_runs(corpus_pipeline, row["input_ids"])
        except AssertionError:
            continue  # upstream cut a run
        if len(runs) != len(s.images):
            continue  # upstream cut an image away
        assert s.index in ours, f"sample {s.index} dropped though upstream keeps its media whole"
        mine = ours[s.index]
        for key in ("input_ids", "labels", "attention_mask", "images"):
            assert mine[key] == row[key], f"sample {s.index}: {key} differs from vanilla's"
        same += 1
        cut += len(row["input_ids"]) < len(reference(corpus_pipeline, mask_history)[s.index].ids)
    print(f"cutoff_len {cutoff} mask_history {mask_history}: {same} samples as vanilla's, {cut} of them cut")
    # enough samples compared to mean something, in proportion to the corpus (500: 187 and 50)
    assert same >= N * 3 // 8 and cut >= N // 10, (same, cut)
