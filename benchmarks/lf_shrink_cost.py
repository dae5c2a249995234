"""Cost of policy `shrink` on LLaMA-Factory preprocessing, side by side in one run.

A corpus where 10% of the samples hold a camera-sized photo (1600x1200 JPEG, over 1,000 image tokens; a
different photo each, so each shrunk sample writes its own file)
that does not fit cutoff_len, and the other 90% a 224 px image with text of any length (some cut).
LLaMA-Factory's real SupervisedDatasetProcessor (real Qwen2-VL image processor, tiny offline
tokenizer) preprocesses it under vanilla, vlpatch `drop` (the photos' samples dropped) and vlpatch
`shrink` (the photos downsized until their samples fit: the rows name each photo at its new size), in
alternating rounds; prints the medians and their ratios.

Then what training pays per epoch for a shrunk photo, in LLaMA-Factory's own `_regularize_images` (what
its collator calls): vanilla reading the original (decoded whole, resized to image_max_pixels), vlpatch
reading the sized entry (decoded at a reduced scale, resized to the chosen size), and the file an
earlier vlpatch wrote instead (a PNG of the chosen size), in alternating rounds.

    .venv/bin/python benchmarks/lf_shrink_cost.py [--samples 300] [--rounds 5] [--share 0.1]
"""

import argparse
import os
import random
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.fixtures.tiny_models import build_tiny_qwen2vl, long_text, write_image  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--share", type=float, default=0.1, help="share of samples whose photo needs shrinking")
    ap.add_argument("--batch", type=int, default=100)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging

    import torch
    from PIL import Image

    torch.set_num_threads(1)  # the same for every mode; a shared 2-core machine otherwise spins
    logging.getLogger("vlpatch").setLevel(logging.ERROR)
    tmp = tempfile.mkdtemp(prefix="vlpatch-bench-")
    model = build_tiny_qwen2vl(os.path.join(tmp, "model"))
    small = [write_image(os.path.join(tmp, f"i{k}.png"), seed=k) for k in range(8)]
    photos = []  # one photo per sample that needs shrinking, as in a real dataset: each writes its own file
    for k in range(max(1, int(args.samples * args.share))):
        img = Image.new("RGB", (1600, 1200), ((20 * k) % 256, 120, (200 + 7 * k) % 256))
        for x in range(0, 1600, 40):
            img.paste((220, 40, 40), (x, 0, x + 8, 1200))
        path = os.path.join(tmp, f"photo{k}.jpg")
        img.save(path, quality=90)
        photos.append(path)

    import vlpatch
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.data.processor import SupervisedDatasetProcessor
    from llamafactory.hparams import DataArguments, ModelArguments
    from llamafactory.model import load_tokenizer

    loaded = load_tokenizer(ModelArguments(model_name_or_path=model, image_max_pixels=1024 * 1024))
    tok, proc = loaded["tokenizer"], loaded["processor"]
    data_args = DataArguments(template="qwen2_vl", cutoff_len=256)
    template = get_template_and_fix_tokenizer(tok, data_args)
    processor = SupervisedDatasetProcessor(template=template, tokenizer=tok, processor=proc, data_args=data_args)

    rng = random.Random(0)
    n = args.samples
    big = set(rng.sample(range(n), int(n * args.share)))
    photo_of = {k: i for i, k in enumerate(sorted(big))}
    data = {
        "_prompt": [[{"role": "user", "content": long_text(rng.choice([5, 60, 250]), k) + " <image>"}] for k in range(n)],
        "_response": [[{"role": "assistant", "content": long_text(rng.randint(3, 40), k + n)}] for k in range(n)],
        "_system": [""] * n,
        "_tools": [""] * n,
        "_images": [[photos[photo_of[k]] if k in big else small[k % 8]] for k in range(n)],
        "_videos": [None] * n,
        "_audios": [None] * n,
    }

    def run_once():
        t = time.perf_counter()
        kept = 0
        for start in range(0, n, args.batch):
            batch = {k: [list(x) if isinstance(x, list) else x for x in v[start : start + args.batch]] for k, v in data.items()}
            kept += len(processor.preprocess_dataset(batch)["input_ids"])
        return time.perf_counter() - t, kept

    print(f"{n} samples, {len(big)} with a 1600x1200 photo ({len(big) / n:.0%}), the rest a 224 px image; "
          f"cutoff_len 256, image_max_pixels 1024^2, {args.rounds} alternating rounds")
    times = {"vanilla": [], "drop": [], "shrink": []}
    kept = {}
    for r in range(args.rounds):
        for mode in times:
            vlpatch.revert()
            if mode != "vanilla":
                vlpatch.apply(policy=mode, report=os.path.join(tmp, f"report_{mode}.jsonl"), shrink_min_pixels=56 * 56)
            seconds, kept[mode] = run_once()
            times[mode].append(seconds)
    vlpatch.revert()
    med = {mode: statistics.median(t) for mode, t in times.items()}
    for mode, m in med.items():
        print(f"  {mode:8s} {m * 1000 / n:7.2f} ms/sample  samples kept {kept[mode]}")
    print(f"ratio shrink/drop    {med['shrink'] / med['drop']:.3f}")
    print(f"ratio shrink/vanilla {med['shrink'] / med['vanilla']:.3f}")
    print(f"ratio drop/vanilla   {med['drop'] / med['vanilla']:.3f}")

    # training time: the collator reads each shrunk photo once per epoch
    import json

    from llamafactory.data.mm_plugin import get_mm_plugin
    from vlpatch.integrations import _media

    with open(os.path.join(tmp, "report_shrink.jsonl"), encoding="utf-8") as fh:
        entries = [x["sized_entry"] for line in fh if line.strip() for x in json.loads(line).get("media_resized", [])]
    entries = list(dict.fromkeys(entries))
    originals, pngs = [], []
    for k, e in enumerate(entries):
        original, size = _media.unmark(e)
        path = os.path.join(tmp, f"written{k}.png")
        Image.open(original).convert("RGB").resize(size, Image.BICUBIC).save(path, format="PNG", compress_level=1)
        originals.append(original)
        pngs.append(path)
    plugin = get_mm_plugin("qwen2_vl", image_token="<|image_pad|>")
    kwargs = dict(image_max_pixels=1024 * 1024, image_min_pixels=32 * 32)
    vlpatch.apply(report=os.path.join(tmp, "report_read.jsonl"))  # sized entries are read by the patched reader
    reads = {"vanilla original": [], "vlpatch sized entry": [], "written PNG": []}
    for _ in range(args.rounds):
        for mode, items in zip(reads, (originals, entries, pngs)):
            t = time.perf_counter()
            for item in items:
                got = plugin._regularize_images([item], **kwargs)
                for im in got["images"] if isinstance(got, dict) else got:
                    im.load()  # the pixels, as the image processor takes them next (a PNG opens lazily)
            reads[mode].append((time.perf_counter() - t) / len(items))
    vlpatch.revert()
    rmed = {mode: statistics.median(t) for mode, t in reads.items()}
    print(f"reading a shrunk photo at training time ({len(entries)} photos, {args.rounds} alternating rounds):")
    for mode, m in rmed.items():
        print(f"  {mode:20s} {m * 1000:7.2f} ms")
    print(f"ratio sized entry/vanilla original {rmed['vlpatch sized entry'] / rmed['vanilla original']:.3f}")
    print(f"ratio sized entry/written PNG      {rmed['vlpatch sized entry'] / rmed['written PNG']:.3f}")


if __name__ == "__main__":
    main()
