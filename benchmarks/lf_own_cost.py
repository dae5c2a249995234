"""vlpatch's own cost in LLaMA-Factory's encode, measured two ways that a busy machine disturbs less than
`lf_multi_image_cost.py`'s ratio of medians (issue 28):

* per-sample minimum: each sample's vanilla `_encode_data_example` and the patched one, interleaved,
  `--reps` times, the minimum thread time of each kept; the ratio of their sums, and vlpatch's own time
  for the samples that fit and for those it cuts;
* bytecodes: the Python bytecodes that vlpatch's own frames execute per sample (`sys.settrace`, slow but
  the same on every run), with the functions that execute most.

The corpus, family set-up and cutoffs are `lf_multi_image_cost.py`'s (the 20th and 90th percentile of
the uncut lengths). Run it in two checkouts to compare them:

    .venv/bin/python benchmarks/lf_own_cost.py [--family gemma3] [--samples 200] [--reps 7] [--top 12]
"""

import argparse
import collections
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks._multi_image import HEADER, lf_setup  # noqa: E402
from tests.fixtures.lf_families import lf_family  # noqa: E402


def bytecodes(call, samples: int, top: int) -> None:
    """Run `call(i)` for every sample with vlpatch's frames traced; print bytecodes per sample."""
    counts: collections.Counter = collections.Counter()
    package = os.path.join(ROOT, "vlpatch")

    def tracer(frame, event, arg):
        if not frame.f_code.co_filename.startswith(package):
            return None
        frame.f_trace_opcodes, frame.f_trace_lines = True, False
        key = f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_code.co_firstlineno}:{frame.f_code.co_name}"

        def local(frame, event, arg):
            if event == "opcode":
                counts[key] += 1
            return local

        return local

    for i in range(samples):
        sys.settrace(tracer)
        try:
            call(i)
        finally:
            sys.settrace(None)
    print(f"  vlpatch's bytecodes per sample: {sum(counts.values()) / samples:.0f}")
    for key, n in counts.most_common(top):
        print(f"    {key:48s} {n / samples:7.0f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="gemma3")
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    tmp, _, data = lf_setup(args.samples, "vlpatch-own-")
    import vlpatch
    from llamafactory.data.processor import SupervisedDatasetProcessor, supervised
    from llamafactory.hparams import DataArguments
    from vlpatch.integrations import llamafactory as lf

    fam, template, _ = lf_family(args.family, os.path.join(tmp, args.family), image_max_pixels=448 * 448)
    vanilla = supervised.SupervisedDatasetProcessor._encode_data_example

    def make(cutoff):
        return SupervisedDatasetProcessor(template=template, tokenizer=fam.tok, processor=fam.proc, data_args=DataArguments(cutoff_len=cutoff))

    def arguments(i):
        return dict(prompt=data["_prompt"][i], response=data["_response"][i], system="", tools="",
                    images=list(data["_images"][i] or []), videos=[], audios=[])

    vlpatch.revert()
    whole = make(1 << 20)
    lengths = [len(vanilla(whole, **arguments(i))[0]) for i in range(args.samples)]
    ordered = sorted(lengths)
    print(f"{args.family}, {args.samples} samples, vlpatch from {os.path.dirname(vlpatch.__file__)}")
    for label, cutoff in (("most cut", ordered[len(ordered) // 5]), ("few cut", ordered[len(ordered) * 9 // 10])):
        instance = make(cutoff)
        plain_split = supervised.infer_seqlen
        vlpatch.apply(policy="drop", exclude=[HEADER])
        patched_split = supervised.infer_seqlen
        batch = lf._Batch({k: list(v) for k, v in data.items()}, False)  # as preprocess_dataset's, one for all

        def patched(i):
            batch.cursor, batch.rows[:] = i, []
            lf._batches.append(batch)
            try:
                instance._encode_data_example(**arguments(i))
            finally:
                lf._batches.pop()

        def plain(i):
            supervised.infer_seqlen = plain_split  # upstream's own, not the patch's recording one
            try:
                vanilla(instance, **arguments(i))
            finally:
                supervised.infer_seqlen = patched_split

        best = {"vanilla": [float("inf")] * args.samples, "patched": [float("inf")] * args.samples}
        for _ in range(args.reps):
            for i in range(args.samples):
                for name, call in (("vanilla", plain), ("patched", patched)):
                    t = time.thread_time()
                    call(i)
                    best[name][i] = min(best[name][i], time.thread_time() - t)
        cut = [i for i in range(args.samples) if lengths[i] > cutoff]
        fit = [i for i in range(args.samples) if lengths[i] <= cutoff]
        v, p = sum(best["vanilla"]), sum(best["patched"])

        def own(group):
            return sum(best["patched"][i] - best["vanilla"][i] for i in group) * 1e6 / max(1, len(group))

        print(f"cutoff_len {cutoff} ({label}: {len(cut) / args.samples:.0%} cut): per-sample minimum ratio {p / v:.3f}; "
              f"vanilla {v * 1e6 / args.samples:.0f} us a sample; vlpatch's own {own(fit):.0f} us a sample that fits, "
              f"{own(cut):.0f} us a cut one", flush=True)
        bytecodes(patched, args.samples, args.top)
        vlpatch.revert()


if __name__ == "__main__":
    main()
