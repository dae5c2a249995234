"""How often a cut row loses its chat frame, without vlpatch and with it (issue 27's measurement).

A seeded corpus of 200 multi-turn samples (1-3 turn pairs; 0-3 images of 4 sizes and 0-2 videos in any
user turn; half with a system prompt of their own, 3-60 words; answers of 3-300 words) goes through
LLaMA-Factory's real `get_dataset` (sft, qwen2_vl, the tiny Qwen2-VL) uncut, vanilla at cutoff_len, and
with vlpatch (policy drop). Per cutoff_len, of the rows each produces:

* `lost system`: rows that do not start with their uncut row's system block and first user header;
* `answer w/o header`: rows whose first supervised token does not follow `<|im_start|>assistant\\n`
  (LLaMA-Factory cuts a prompt from its end, that header included);
* `media cut`: vanilla rows with a vision run cut (the forward pass dies on them; vlpatch: always 0).

    .venv/bin/python benchmarks/chat_frame.py
"""

import json
import os
import random
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.fixtures.chat_frame import qwen_frame  # noqa: E402
from tests.fixtures.tiny_models import _register, build_tiny_qwen2vl, long_text  # noqa: E402
from tests.fixtures.tiny_qwen3vl import write_video  # noqa: E402

N = 200
CUTOFFS = (256, 600, 1200)
SIZES = [(56, 56), (112, 112), (224, 224), (336, 224)]
UNBOUNDED = 1 << 20


def build(directory: str, seed: int = 27):
    from PIL import Image

    rng = random.Random(seed)
    media_rows, text_rows = [], []
    for i in range(N):
        turns = rng.randint(1, 3)
        messages, images, videos = [], [], []
        for t in range(turns):
            words = long_text(rng.choice([rng.randint(0, 10), rng.randint(10, 80)]), seed=rng.randrange(1 << 30)).split()
            for _ in range(rng.choice([0, 0, 1, 1, 2, 3]) if t == 0 or rng.random() < 0.3 else 0):
                name = f"f{i}_{len(images)}.png"
                Image.new("RGB", rng.choice(SIZES), (i % 251, 90, 150)).save(os.path.join(directory, name))
                images.append(name)
                words.insert(rng.randint(0, len(words)), "<image>")
            for _ in range(rng.choice([0, 0, 0, 1, 2]) if t == 0 or rng.random() < 0.2 else 0):
                name = f"v{i}_{len(videos)}.mp4"
                write_video(os.path.join(directory, name), frames=4, fps=2, side=56, seed=i)
                videos.append(name)
                words.insert(rng.randint(0, len(words)), "<video>")
            messages.append({"role": "user", "content": " ".join(words) or "hi"})
            messages.append({"role": "assistant", "content": long_text(rng.choice([rng.randint(3, 20), rng.randint(20, 300)]),
                                                                       seed=rng.randrange(1 << 30))})
        system = long_text(rng.randint(3, 60), seed=rng.randrange(1 << 30)) if rng.random() < 0.5 else ""
        row = {"messages": messages, "system": system}
        if images or videos:
            media_rows.append({**row, "images": images, "videos": videos})
        else:
            text_rows.append(row)
    _register(directory, "frame_media", media_rows, {"messages": "messages", "system": "system", "images": "images", "videos": "videos"})
    _register(directory, "frame_text", text_rows, {"messages": "messages", "system": "system"})
    return [r["system"] for r in media_rows + text_rows]


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

    work = tempfile.mkdtemp(prefix="vlpatch-frame-")
    model = build_tiny_qwen2vl(os.path.join(work, "model"))
    data = os.path.join(work, "data")
    os.makedirs(data)
    systems = build(data)
    model_args = ModelArguments(model_name_or_path=model, image_max_pixels=224 * 224, video_max_pixels=56 * 56, video_fps=2.0)
    module = load_tokenizer(model_args)
    tok = module["tokenizer"]
    header = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    pads = {tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>")}
    start, end = tok.convert_tokens_to_ids("<|vision_start|>"), tok.convert_tokens_to_ids("<|vision_end|>")

    def run(cutoff, policy):
        report = os.path.join(work, f"r_{cutoff}_{policy}.jsonl")
        vlpatch.revert()
        if policy:
            vlpatch.apply(policy=policy, report=report)
        try:
            args = DataArguments(template="qwen2_vl", dataset="frame_media,frame_text", dataset_dir=data, cutoff_len=cutoff, overwrite_cache=True)
            template = get_template_and_fix_tokenizer(tok, args)
            ds = get_dataset(template, model_args, args, Seq2SeqTrainingArguments(output_dir=os.path.join(work, "o"), report_to="none"),
                             "sft", **module)["train_dataset"]
            rows = [ds[i] for i in range(len(ds))]
        finally:
            vlpatch.revert()
        dropped = set()
        if os.path.exists(report):
            dropped = {json.loads(x)["index"] for x in open(report) if json.loads(x)["action"] == "dropped"}
        return rows, dropped

    def media_cut(ids):
        inside = False
        for k, t in enumerate(ids):
            if t == start:
                inside = True
            elif t == end:
                inside = False
            elif inside and t not in pads:
                return True
        return inside

    uncut, _ = run(UNBOUNDED, None)
    frames = []
    for system, row in zip(systems, uncut):
        frames.append(qwen_frame(tok, row["input_ids"], system))
    print(f"{len(uncut)} samples; uncut tokens: median {sorted(len(r['input_ids']) for r in uncut)[len(uncut) // 2]}, "
          f"max {max(len(r['input_ids']) for r in uncut)}")
    print("| cutoff_len | run | rows | cut rows | lost system | answer w/o header | media cut |")
    print("|---|---|---|---|---|---|---|")
    for cutoff in CUTOFFS:
        for name, policy in (("vanilla", None), ("vlpatch (drop)", "drop")):
            rows, dropped = run(cutoff, policy)
            kept = [i for i in range(len(uncut)) if i not in dropped]
            assert len(kept) == len(rows)
            cut = lost = headless = broken = 0
            for i, row in zip(kept, rows):
                ids, labels = row["input_ids"], row["labels"]
                if len(ids) == len(uncut[i]["input_ids"]):
                    continue
                cut += 1
                lost += ids[: frames[i]] != uncut[i]["input_ids"][: frames[i]]
                a = next((k for k, x in enumerate(labels) if x != -100), None)
                headless += a is not None and ids[max(0, a - len(header)) : a] != header
                broken += media_cut(ids)
            print(f"| {cutoff} | {name} | {len(rows)} | {cut} | {lost} | {headless} | {broken} |")


if __name__ == "__main__":
    main()
