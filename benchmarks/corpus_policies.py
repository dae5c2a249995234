"""Samples kept per policy and cutoff_len on the generated multi-turn corpus (docs/policies.md: what each
policy keeps, measured).

The corpus of tests/test_llamafactory_corpus.py (tests/fixtures/sharegpt_corpus.py: 500 sharegpt samples, 1-4 turn pairs, 0-6 images of
8 sizes in any user turn) through LLaMA-Factory's real `get_dataset` with vlpatch applied, for each
cutoff_len, mask_history setting and policy; counts from vlpatch's own report (a sample without a row
came out whole). Policy shrink runs with the floor the corpus test uses (56x56) and with the default
floor (256x256: the corpus' largest images are 448x448, so most of them cannot shrink far).

    .venv/bin/python benchmarks/corpus_policies.py
"""

import json
import os
import sys
import tempfile
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.fixtures.tiny_models import build_tiny_qwen2vl  # noqa: E402
from tests.fixtures.sharegpt_corpus import MAX_PIXELS, build_corpus  # noqa: E402

CASES = [(128, False), (128, True), (256, False), (256, True), (384, False), (384, True)]
POLICIES = [("drop", {}), ("drop_media", {}), ("shrink", {"shrink_min_pixels": 56 * 56}), ("shrink", {})]


def main():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging

    import torch

    torch.set_num_threads(1)
    logging.getLogger("vlpatch").setLevel(logging.ERROR)
    import vlpatch
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments, ModelArguments
    from llamafactory.model import load_tokenizer
    from transformers import Seq2SeqTrainingArguments
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tmp = tempfile.mkdtemp(prefix="vlpatch-corpus-")
    os.makedirs(os.path.join(tmp, "data"))
    corpus = build_corpus(os.path.join(tmp, "data"))
    model = build_tiny_qwen2vl(os.path.join(tmp, "model"))
    model_args = ModelArguments(model_name_or_path=model, image_max_pixels=MAX_PIXELS)
    module = load_tokenizer(model_args)
    n = len(corpus.samples)
    print(f"{n} samples, {sum(len(s.images) for s in corpus.samples)} images; counts from vlpatch's report\n")
    print("| cutoff_len | mask_history | policy | whole | text cut | media left with turn | shrunk | media_dropped | dropped |")
    print("|---|---|---|---|---|---|---|---|---|")
    for cutoff, mask_history in CASES:
        for policy, extra in POLICIES:
            report = os.path.join(tmp, f"r_{cutoff}_{mask_history}_{policy}_{len(extra)}.jsonl")
            vlpatch.revert()
            vlpatch.apply(policy=policy, report=report, shrink_dir=os.path.join(tmp, "media"), **extra)
            data_args = DataArguments(template="qwen2_vl", dataset="corpus_img,corpus_text", dataset_dir=corpus.data_dir,
                                      cutoff_len=cutoff, mask_history=mask_history, overwrite_cache=True)
            training_args = Seq2SeqTrainingArguments(output_dir=os.path.join(tmp, "out"), report_to="none", use_cpu=True)
            template = get_template_and_fix_tokenizer(module["tokenizer"], data_args)
            get_dataset(template, model_args, data_args, training_args, "sft", **module)
            vlpatch.revert()
            rows = [json.loads(x) for x in open(report, encoding="utf-8")] if os.path.exists(report) else []
            c = Counter()
            for r in rows:
                if r["action"] == "truncated":
                    c["media left with turn" if r.get("media_removed") else "text cut"] += 1
                else:
                    c[r["action"]] += 1
            c["whole"] = n - len(rows)
            name = policy if not extra else f"{policy} (floor 56x56)"
            if policy == "shrink" and not extra:
                name = "shrink (default floor)"
            print(f"| {cutoff} | {'yes' if mask_history else 'no'} | {name} | {c['whole']} | {c['text cut']} | "
                  f"{c['media left with turn']} | {c['shrunk']} | {c['media_dropped']} | {c['dropped']} |")


if __name__ == "__main__":
    main()
