"""Header-only token counts: how much faster LLaMA-Factory's preprocessing gets, measured side by side.

1. LLaMA-Factory's real SupervisedDatasetProcessor.preprocess_dataset (one worker, the real
   Qwen2-VL image processor of a tiny offline model) on an image-heavy dataset, vanilla vs with
   `llamafactory.header_tokens`, in alternating rounds on the same data; ratio of the medians.
2. Token counts per image: the header path (`vlpatch.tokens.image_header` + the arithmetic, what
   `vlpatch scan` uses) vs LLaMA-Factory's processor path for one image (open, decode, resize, the image
   processor), alternating rounds; ratio of the medians.

    .venv/bin/python benchmarks/lf_header_speed.py [--samples 200] [--rounds 3]
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

from tests.fixtures.tiny_models import _register, build_tiny_qwen2vl  # noqa: E402


def photos(directory, n, seed=0):
    """JPEG / PNG / WebP files of camera-like sizes with smooth content (decoding cost is per pixel)."""
    from PIL import Image

    rng = random.Random(seed)
    sizes = [(1280, 960), (1920, 1080), (1024, 768), (800, 600), (3024, 4032), (640, 480)]
    out = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        im = Image.linear_gradient("L").resize((w, h)).convert("RGB")
        im = Image.merge("RGB", [im.getchannel(0), im.getchannel(1).rotate(rng.randint(0, 90)), im.getchannel(2)])
        ext = ("jpg", "png", "webp")[i % 3]
        path = os.path.join(directory, f"p{i}.{ext}")
        im.save(path, quality=85) if ext != "png" else im.save(path)
        out.append(path)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--images", type=int, default=2, help="images per sample")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging

    logging.getLogger("vlpatch").setLevel(logging.ERROR)
    tmp = tempfile.mkdtemp(prefix="vlpatch-bench-")
    model = build_tiny_qwen2vl(os.path.join(tmp, "model"))
    pool = photos(tmp, 30)

    import vlpatch
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.data.processor import SupervisedDatasetProcessor
    from llamafactory.hparams import DataArguments, ModelArguments
    from llamafactory.model import load_tokenizer

    from vlpatch import tokens
    from vlpatch.integrations import lf_header

    loaded = load_tokenizer(ModelArguments(model_name_or_path=model))  # LLaMA-Factory's default image limits
    tok, proc = loaded["tokenizer"], loaded["processor"]
    data_args = DataArguments(template="qwen2_vl", cutoff_len=100_000)
    template = get_template_and_fix_tokenizer(tok, data_args)
    processor = SupervisedDatasetProcessor(template=template, tokenizer=tok, processor=proc, data_args=data_args)
    n, k = args.samples, args.images
    data = {
        "_prompt": [[{"role": "user", "content": "<image>" * k + " what is in these pictures?"}] for _ in range(n)],
        "_response": [[{"role": "assistant", "content": "gradients"}] for _ in range(n)],
        "_system": [""] * n,
        "_tools": [""] * n,
        "_images": [[pool[(i * k + j) % len(pool)] for j in range(k)] for i in range(n)],
        "_videos": [None] * n,
        "_audios": [None] * n,
    }

    def preprocess():
        t = time.perf_counter()
        out = processor.preprocess_dataset(data)
        return time.perf_counter() - t, out["input_ids"]

    print(f"1. LLaMA-Factory preprocessing: {n} samples x {k} images (camera sizes, JPEG/PNG/WebP), 1 worker, {args.rounds} alternating rounds")
    times = {"vanilla": [], "header": []}
    for _ in range(args.rounds):
        vlpatch.revert()
        t, ids_v = preprocess()
        times["vanilla"].append(t)
        vlpatch.apply(patches=["llamafactory.header_tokens"])
        lf_header.stats.clear()
        t, ids_h = preprocess()
        times["header"].append(t)
        assert ids_h == ids_v, "header-only input_ids differ from vanilla"
        assert lf_header.stats["header"] == n * k, dict(lf_header.stats)
    vlpatch.revert()
    v, h = statistics.median(times["vanilla"]), statistics.median(times["header"])
    print(f"   vanilla {v:.2f}s, header-only {h:.2f}s (medians): {v / h:.1f}x faster; input_ids identical")

    plugin, ip = template.mm_plugin, proc.image_processor
    limits = dict(image_max_pixels=getattr(proc, "image_max_pixels", 768 * 768), image_min_pixels=getattr(proc, "image_min_pixels", 32 * 32))
    vision = tokens.QwenVision(ip.patch_size, ip.merge_size, *(lf_header.geometry(ip)[2:]) if lf_header.geometry(ip) else (56 * 56, 28 * 28 * 1280))

    def by_processor():
        t = time.perf_counter()
        for path in pool:
            images = plugin._regularize_images([path], **limits)
            images = images["images"] if isinstance(images, dict) else images
            ip(images, return_tensors="pt")
        return time.perf_counter() - t

    def by_header():
        t = time.perf_counter()
        for path in pool:
            w, h = tokens.image_header(path)
            tokens.lf_qwen_image_tokens(w, h, vision, limits["image_max_pixels"], limits["image_min_pixels"])
        return time.perf_counter() - t

    print(f"2. token count per image: {len(pool)} images, header vs LLaMA-Factory's processor path, {args.rounds} alternating rounds")
    times = {"processor": [], "header": []}
    for _ in range(args.rounds):
        times["processor"].append(by_processor())
        times["header"].append(by_header())
    p, h = statistics.median(times["processor"]), statistics.median(times["header"])
    print(f"   processor {p * 1000 / len(pool):.1f} ms/image, header {h * 1000 / len(pool):.3f} ms/image: {p / h:.0f}x faster")

    # 3. the whole `vlpatch scan` (config parsing, dataset loading, three passes of LLaMA-Factory's own
    #    processor on the over-long samples) vs vanilla preprocessing of the same samples (part 1)
    from vlpatch import scan as vscan

    rows = [
        {"messages": [{"role": "user", "content": "<image>" * k + " what is in these pictures?"}, {"role": "assistant", "content": "gradients"}],
         "images": data["_images"][i]}
        for i in range(n)
    ]
    _register(tmp, "photos", rows, {"messages": "messages", "images": "images"})
    config = {"model_name_or_path": model, "dataset": "photos", "dataset_dir": tmp, "template": "qwen2_vl", "cutoff_len": 1024,
              "output_dir": os.path.join(tmp, "out")}
    scan_times = []
    for _ in range(args.rounds):
        t = time.perf_counter()
        result = vscan.scan(config)
        scan_times.append(time.perf_counter() - t)
    s_med = statistics.median(scan_times)
    over = sum(x["tokens"] > 1024 for x in result["samples"])
    print(f"3. vlpatch scan of the same {n} samples (cutoff_len 1024: {over} over-long, three passes each), {args.rounds} rounds")
    print(f"   scan {s_med:.2f}s vs vanilla preprocessing {v:.2f}s (part 1): {v / s_med:.1f}x faster")


if __name__ == "__main__":
    main()
