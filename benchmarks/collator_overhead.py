"""Cost of the Unsloth and TRL collator patches: patched vs vanilla collator calls, same batches, one run.

Calls the real `UnslothVisionDataCollator` (unsloth_zoo, imported on CPU as the tests import it:
tests/fixtures/unsloth_import.py) and TRL's real `DataCollatorForVisionLanguageModeling` (the SFT
collator) around the tiny offline Qwen2-VL's real processor (tests/fixtures/tiny_models.py), on the same
batches, alternating vanilla and patched rounds (vlpatch.revert() / vlpatch.apply(), the default policy)
so that machine noise hits both alike, which of the two goes first swapped each round (on the loaded
2-core machine, vanilla against vanilla in a fixed order differed by up to 5%); one torch thread; prints
ms per batch and the ratio of the medians. Only the collator call is timed (each batch gets fresh copies
of its examples beforehand: the TRL collator changes its examples in place).

The seeded rows: one user turn of a few words, 1-3 images of 224 px (66 tokens each) with 0-8 words
after each, then 60-200 words, and an answer of 3-30 words. Two max lengths per trainer, from the uncut
lengths: one above every row (the batches fit: the patch's fast path, what the issue's goal of at most
1.05 is about) and one below most rows but past the last image of every row, so that vanilla's
truncation cuts text only and its processor call returns (a cut inside an image run makes the
Qwen2-VL processor raise on its image token count), while the patch plans the cut of each long row.

A second line per case gives vlpatch's own steps, timed inside the patched calls: the time in the
functions of STEPS (the placeholder check, the first-turn and chat-frame reads, `fit`: the media-run
check of every batch, and the cut and rebuild of long rows), over vanilla's time per batch. It is
steadier than the ratio on a loaded machine (no second run to compare with); what it leaves out is the
wrappers' own call overhead and that, under the patch, upstream collates uncut (a processor call without
truncation against vanilla's truncating one).

    python benchmarks/collator_overhead.py [--trainer unsloth|trl|both] [--rounds 7] [--batches 20] [--batch 8]

Run it in an environment with unsloth_zoo and/or trl installed; a trainer whose package is missing is
skipped with a line saying so.
"""

import argparse
import copy
import importlib.util
import os
import random
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.fixtures.tiny_models import build_tiny_qwen2vl, image, long_text  # noqa: E402

PACKAGES = {"unsloth": "unsloth_zoo", "trl": "trl"}
# vlpatch's own steps in a patched collator call (module functions, looked up at each call): timed by a
# wrapper for the whole run, outermost call only; upstream's code is not touched
STEPS = [
    ("vlpatch.integrations.unsloth", "_checked"),  # Unsloth: one placeholder per image
    ("vlpatch.integrations._collator", "copies_for_shrink"),  # copies of the examples (policy shrink only)
    ("vlpatch.integrations._collator", "first_turn_items"),
    ("vlpatch.integrations._collator", "chat_frames"),
    ("vlpatch.integrations._collator", "CollatorPatch.fit"),  # the media-run check on every batch, the cut and rebuild of long rows
]
spent = [0.0]  # time in STEPS since the last reset
_depth = [0]


def time_steps() -> None:
    import importlib

    for module, name in STEPS:
        owner = importlib.import_module(module)
        *path, name = name.split(".")  # a function, or a method of a class of the module
        for part in path:
            owner = getattr(owner, part)
        step = getattr(owner, name)

        def timed(*a, _step=step, **k):
            _depth[0] += 1
            t = time.perf_counter()
            try:
                return _step(*a, **k)
            finally:
                _depth[0] -= 1
                if not _depth[0]:
                    spent[0] += time.perf_counter() - t

        setattr(owner, name, timed)


def rows(n: int, seed: int = 7) -> list:
    """`n` messages rows with an `images` column: a few words, 1-3 images of 224 px (some words after
    each), a long text, an answer."""
    rng = random.Random(seed)
    pictures = [image(224, seed=k) for k in range(6)]
    out = []
    for _ in range(n):
        count = rng.randint(1, 3)
        content = [{"type": "text", "text": long_text(rng.randint(2, 12), rng.randrange(1 << 30))}]
        for _ in range(count):
            content.append({"type": "image"})
            words = rng.randint(0, 8)
            if words:
                content.append({"type": "text", "text": " " + long_text(words, rng.randrange(1 << 30))})
        content.append({"type": "text", "text": " " + long_text(rng.randint(60, 200), rng.randrange(1 << 30))})
        answer = long_text(rng.randint(3, 30), rng.randrange(1 << 30))
        out.append({
            "messages": [
                {"role": "user", "content": content},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
            ],
            "images": [rng.choice(pictures) for _ in range(count)],
        })
    return out


def fresh(batch: list) -> list:
    """Copies of a batch's examples that a collator may change in place (messages copied, images shared)."""
    return [{**e, "messages": copy.deepcopy(e["messages"]), "images": list(e["images"])} for e in batch]


def unsloth_factory(model_dir: str):
    """(make(max_len) -> a new UnslothVisionDataCollator, the release) or a reason it cannot run."""
    import inspect

    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    from tests.fixtures.unsloth_import import import_vision_utils
    from vlpatch import engine

    vision_utils = import_vision_utils()
    accepts = inspect.signature(vision_utils.UnslothVisionDataCollator.__init__).parameters
    if "max_seq_length" not in accepts:
        return None, f"unsloth_zoo {engine.installed_version('unsloth_zoo')}: its collator never cuts (no max_seq_length)"
    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir)  # read for its dtype only
    processor = AutoProcessor.from_pretrained(model_dir)

    def make(max_len):
        kwargs = {"resize": "max"} if "resize" in accepts else {}
        return vision_utils.UnslothVisionDataCollator(model, processor, max_seq_length=max_len, **kwargs)

    return make, f"unsloth_zoo {engine.installed_version('unsloth_zoo')}"


def trl_factory(model_dir: str):
    import importlib.metadata

    from transformers import AutoProcessor

    try:
        from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling
    except ImportError as exc:
        return None, f"trl {importlib.metadata.version('trl')} has no vision collator ({exc})"
    processor = AutoProcessor.from_pretrained(model_dir)

    def make(max_len):
        return DataCollatorForVisionLanguageModeling(processor, max_length=max_len)

    return make, f"trl {importlib.metadata.version('trl')}"


def measure(trainer: str, make, data: list, args) -> None:
    import vlpatch

    batches = [data[k: k + args.batch] for k in range(0, len(data), args.batch)]
    vision_end = None

    # the uncut lengths, and where each row's last image run ends
    vlpatch.revert()
    uncut = make(None)
    lengths, media_ends = [], []
    for b in batches:
        out = uncut(fresh(b))
        if vision_end is None:
            vision_end = uncut.processor.tokenizer.convert_tokens_to_ids("<|vision_end|>")
        for ids, mask in zip(out["input_ids"], out["attention_mask"]):
            row = ids[mask.bool()].tolist()
            lengths.append(len(row))
            media_ends.append(max(i for i, t in enumerate(row) if t == vision_end) + 1)
    ordered = sorted(lengths)
    fit_len = ordered[-1] + 8
    cut_len = max(max(media_ends) + 8, ordered[len(ordered) // 5])
    share = sum(n > cut_len for n in lengths) / len(lengths)
    print(f"{trainer}: {len(data)} rows in batches of {args.batch}, {sum(len(e['images']) for e in data)} images; "
          f"lengths {ordered[0]}-{ordered[-1]} (median {ordered[len(ordered) // 2]}), last image run ends by {max(media_ends)}",
          flush=True)

    def reported():
        path = os.environ["VLPATCH_REPORT"]
        return sum(1 for _ in open(path, encoding="utf-8")) if os.path.exists(path) else 0

    for label, max_len in (("batches fit", fit_len), ("batches cut", cut_len)):
        collator = make(max_len)
        before = reported()
        times = {"vanilla": [], "patched": []}
        own = {"vanilla": [], "patched": []}  # time in vlpatch's steps (STEPS) per run: nothing in vanilla's

        def run_once(collator=collator):
            copies = [fresh(b) for b in batches]
            total, spent[0] = 0.0, 0.0
            for c in copies:
                t = time.perf_counter()
                collator(c)
                total += time.perf_counter() - t
            return total, spent[0]

        for r in range(args.rounds):  # vanilla first in even rounds, patched first in odd ones (no place favoured)
            for mode in ("vanilla", "patched") if r % 2 == 0 else ("patched", "vanilla"):
                vlpatch.apply() if mode == "patched" else vlpatch.revert()
                total, steps = run_once()
                times[mode].append(total)
                own[mode].append(steps)
        vlpatch.revert()
        v, p = statistics.median(times["vanilla"]), statistics.median(times["patched"])
        mine = statistics.median(own["patched"])
        what = "no row cut" if label == "batches fit" else f"{share:.0%} of rows cut"
        if label == "batches cut":  # the patch was in force: it reported each row it cut
            cut_rows = reported() - before
            assert cut_rows == args.rounds * sum(n > cut_len for n in lengths), (cut_rows, args.rounds)
        print(f"{trainer:7s} {label} (max length {max_len:4d}, {what:16s}) vanilla {v * 1000 / len(batches):7.2f} ms/batch  "
              f"patched {p * 1000 / len(batches):7.2f} ms/batch  ratio patched/vanilla {p / v:.3f}", flush=True)
        print(f"{'':7s} {label}: vlpatch's own steps {mine * 1000 / len(batches):5.2f} ms/batch = {mine / v:5.1%} of vanilla's call",
              flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trainer", choices=["unsloth", "trl", "both"], default="both")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batches", type=int, default=20, help="batches per round")
    ap.add_argument("--batch", type=int, default=8, help="rows per batch")
    args = ap.parse_args()
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(name, "1")
    import logging

    import torch

    torch.set_num_threads(1)
    logging.getLogger("vlpatch").setLevel(logging.ERROR)
    tmp = tempfile.mkdtemp(prefix="vlpatch-collator-")
    os.environ["VLPATCH_REPORT"] = os.path.join(tmp, "report.jsonl")
    model_dir = build_tiny_qwen2vl(os.path.join(tmp, "model"))
    data = rows(args.batches * args.batch)
    time_steps()
    print(f"{args.rounds} alternating rounds of {args.batches} batches x {args.batch} rows, one torch thread; "
          "ratio = patched / vanilla, medians; only the collator call timed", flush=True)
    trainers = ["unsloth", "trl"] if args.trainer == "both" else [args.trainer]
    for trainer in trainers:
        if importlib.util.find_spec(PACKAGES[trainer]) is None:
            print(f"{trainer}: skipped, {PACKAGES[trainer]} is not installed in this environment", flush=True)
            continue
        make, release = (unsloth_factory if trainer == "unsloth" else trl_factory)(model_dir)
        if make is None:
            print(f"{trainer}: skipped, {release}", flush=True)
            continue
        print(f"{trainer}: {release}", flush=True)
        measure(trainer, make, data, args)


if __name__ == "__main__":
    main()
