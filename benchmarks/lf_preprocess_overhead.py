"""Cost of the LLaMA-Factory patch on dataset preprocessing: patched vs vanilla, same data, one run.

Runs LLaMA-Factory's real SupervisedDatasetProcessor.preprocess_dataset (real Qwen2-VL image
processor, tiny offline tokenizer) over the same batches, alternating vanilla and patched rounds so
that machine noise hits both alike, and prints the ratio of the medians. Two datasets: every sample
fits cutoff_len (the patch's fast path), and every sample is cut (the patch plans each one).

    .venv/bin/python benchmarks/lf_preprocess_overhead.py [--samples 200] [--rounds 5]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.fixtures.tiny_models import build_tiny_qwen2vl, long_text, write_image  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=100)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging

    logging.getLogger("vlpatch").setLevel(logging.ERROR)
    tmp = tempfile.mkdtemp(prefix="vlpatch-bench-")
    model = build_tiny_qwen2vl(os.path.join(tmp, "model"))
    images = [write_image(os.path.join(tmp, f"i{k}.png"), seed=k) for k in range(8)]

    import vlpatch
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.data.processor import SupervisedDatasetProcessor
    from llamafactory.hparams import DataArguments, ModelArguments
    from llamafactory.model import load_tokenizer

    loaded = load_tokenizer(ModelArguments(model_name_or_path=model, image_max_pixels=224 * 224))
    tok, proc = loaded["tokenizer"], loaded["processor"]
    data_args = DataArguments(template="qwen2_vl", cutoff_len=128)
    template = get_template_and_fix_tokenizer(tok, data_args)
    processor = SupervisedDatasetProcessor(template=template, tokenizer=tok, processor=proc, data_args=data_args)

    def dataset(words):
        n = args.samples
        return {
            "_prompt": [[{"role": "user", "content": long_text(words, k) + " <image>"}] for k in range(n)],
            "_response": [[{"role": "assistant", "content": "a red square"}] for _ in range(n)],
            "_system": [""] * n,
            "_tools": [""] * n,
            "_images": [[images[k % len(images)]] for k in range(n)],
            "_videos": [None] * n,
            "_audios": [None] * n,
        }

    def run_once(data):
        t = time.perf_counter()
        for start in range(0, args.samples, args.batch):
            processor.preprocess_dataset({k: v[start : start + args.batch] for k, v in data.items()})
        return time.perf_counter() - t

    os.environ["VLPATCH_REPORT"] = os.path.join(tmp, "report.jsonl")
    print(f"{args.samples} samples, 1 image each (66 tokens), cutoff_len 128, {args.rounds} alternating rounds")
    for label, words in (("all samples fit", 5), ("all samples cut", 120)):
        data = dataset(words)
        times = {"vanilla": [], "patched": []}
        for _ in range(args.rounds):
            vlpatch.revert()
            times["vanilla"].append(run_once(data))
            vlpatch.apply()
            times["patched"].append(run_once(data))
        vlpatch.revert()
        v, p = statistics.median(times["vanilla"]), statistics.median(times["patched"])
        print(
            f"{label:16s} vanilla {v * 1000 / args.samples:7.2f} ms/sample  patched {p * 1000 / args.samples:7.2f} ms/sample"
            f"  ratio patched/vanilla {p / v:.3f}"
        )


if __name__ == "__main__":
    main()
