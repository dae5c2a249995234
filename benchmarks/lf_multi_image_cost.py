"""The LLaMA-Factory patch's cost on multi-image, multi-turn data: patched vs vanilla preprocessing in one
process, alternating rounds, ratio of the medians (issue 28's measurement).

The seeded corpus of `_multi_image.py`: samples of 1-3 turn pairs, 0-6 images in all (JPEG, 48 px to 1600
px, in any user turn), user texts of 0-300 words, answers of 1-120. Per family (the tiny processors of
`tests/fixtures/tiny_processors.py` set up as LLaMA-Factory sets up a model's, the real plugin and
`SupervisedDatasetProcessor`): Qwen2-VL (its plugin processes every image at preprocessing; vlpatch's
header-only token counts off and on), LLaVA (processes images too) and Gemma 3 (writes a fixed run per
image: its vanilla does no image work, so what is measured is vlpatch's own; `gemma3` writes the tests'
16 soft tokens an image, `gemma3_256` Gemma 3's own 256, whose tokenizing is then vanilla's main work).
Two cutoff_len per family, from the uncut lengths: one that cuts most samples (their 20th percentile)
and one that cuts few (90th).

Two measures (`--measure`): `preprocess` times `preprocess_dataset` alone on the columns, batches of
`--batch` (the strict one: nothing of upstream's loading dilutes vlpatch's cost); `get_dataset` times
LLaMA-Factory's whole `get_dataset` as training calls it (the corpus as a sharegpt JSON file: loading,
conversion, datasets' `map` with its Arrow writes, `overwrite_cache`), the measure the issue was filed with.

    .venv/bin/python benchmarks/lf_multi_image_cost.py [--samples 300] [--rounds 3] [--families qwen2_vl,llava,gemma3,gemma3_256]
        [--measure preprocess,get_dataset]
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks._multi_image import HEADER, lf_setup  # noqa: E402
from tests.fixtures.lf_families import lf_family  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--families", default="qwen2_vl,llava,gemma3,gemma3_256")
    ap.add_argument("--measure", default="preprocess", help="preprocess, get_dataset, or both (comma-separated)")
    args = ap.parse_args()
    measures = args.measure.split(",")
    tmp, rows, data = lf_setup(args.samples, "vlpatch-multi-")
    import vlpatch
    from llamafactory.data.processor import SupervisedDatasetProcessor
    from llamafactory.hparams import DataArguments

    dataset_dir = write_dataset(tmp, rows) if "get_dataset" in measures else None
    print(f"{args.samples} samples, {sum(len(i) for _, _, i in rows)} images (48-1600 px), 1-3 turn pairs; "
          f"{args.rounds} alternating rounds, one torch thread; ratio = patched / vanilla, medians")
    for family in args.families.split(","):
        fam, template, _ = lf_family(family, os.path.join(tmp, family), image_max_pixels=448 * 448)

        def preprocess(cutoff):
            processor = SupervisedDatasetProcessor(template=template, tokenizer=fam.tok, processor=fam.proc,
                                                   data_args=DataArguments(cutoff_len=cutoff))
            # each run its own media lists, as datasets' map hands each batch fresh from Arrow (a sample
            # whose media the policy takes out loses them from its list: the output row's images)
            batches = [{k: [list(x) if k == "_images" and x else x for x in v[start: start + args.batch]] for k, v in data.items()}
                       for start in range(0, args.samples, args.batch)]
            t = time.perf_counter()
            out = []
            for b in batches:
                out.extend(processor.preprocess_dataset(b)["input_ids"])
            return time.perf_counter() - t, out

        def whole(cutoff):
            return get_dataset_once(family, fam, template, dataset_dir, os.path.join(tmp, family), cutoff)

        vlpatch.revert()
        lengths = sorted(len(ids) for ids in preprocess(1 << 20)[1])
        cutoffs = {"most cut": lengths[len(lengths) // 5], "few cut": lengths[len(lengths) * 9 // 10]}
        modes = [("header counts off", [HEADER]), ("header counts on", [])] if family.startswith("qwen") else [("", [HEADER])]
        for label, cutoff in cutoffs.items():
            share = sum(n > cutoff for n in lengths) / len(lengths)
            for mode, exclude in modes:
                for measure, run_once in (("preprocess", preprocess), ("get_dataset", whole)):
                    if measure not in measures:
                        continue
                    times = {"vanilla": [], "patched": []}
                    for _ in range(args.rounds):
                        vlpatch.revert()
                        times["vanilla"].append(run_once(cutoff)[0])
                        vlpatch.apply(policy="drop", exclude=exclude)
                        times["patched"].append(run_once(cutoff)[0])
                    vlpatch.revert()
                    v, p = statistics.median(times["vanilla"]), statistics.median(times["patched"])
                    print(f"{family:10s} cutoff_len {cutoff:5d} ({label}: {share:4.0%} of samples cut) {mode:17s} {measure:11s} "
                          f"vanilla {v * 1000 / args.samples:6.2f} ms/sample  patched {p * 1000 / args.samples:6.2f} ms/sample  "
                          f"ratio {p / v:.3f}", flush=True)


def write_dataset(directory: str, rows) -> str:
    """The corpus as a sharegpt dataset `multi` (JSON and dataset_info.json) in `directory`."""
    with open(os.path.join(directory, "multi.json"), "w", encoding="utf-8") as fh:
        json.dump([{"messages": p + r, "images": list(i)} for p, r, i in rows], fh)
    info = {"multi": {"file_name": "multi.json", "formatting": "sharegpt",
                      "columns": {"messages": "messages", "images": "images"},
                      "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}}
    with open(os.path.join(directory, "dataset_info.json"), "w", encoding="utf-8") as fh:
        json.dump(info, fh)
    return directory


def get_dataset_once(family: str, fam, template, dataset_dir: str, model_dir: str, cutoff: int) -> tuple:
    """(seconds, input_ids) of LLaMA-Factory's `get_dataset` (stage sft) on the corpus at `cutoff`."""
    import dataclasses

    from llamafactory.data import get_dataset
    from llamafactory.hparams import DataArguments, ModelArguments
    from transformers import Seq2SeqTrainingArguments

    known = {f.name for f in dataclasses.fields(ModelArguments)}
    model_args = ModelArguments(model_name_or_path=model_dir, image_max_pixels=448 * 448,
                                **{k: v for k, v in fam.model_args.items() if k in known})
    data_args = DataArguments(template=fam.template, dataset="multi", dataset_dir=dataset_dir, cutoff_len=cutoff,
                              overwrite_cache=True)
    training_args = Seq2SeqTrainingArguments(output_dir=os.path.join(dataset_dir, "out"), report_to="none", use_cpu=True)
    t = time.perf_counter()
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # its printed example row
        dataset = get_dataset(template, model_args, data_args, training_args, "sft", tokenizer=fam.tok, processor=fam.proc)
    return time.perf_counter() - t, dataset["train_dataset"]["input_ids"]


if __name__ == "__main__":
    main()
