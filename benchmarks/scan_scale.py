"""`vlpatch scan` at scale: time with 1 and 2 worker processes side by side, and peak memory.

Generates a sharegpt dataset of N samples (default 100,000): 1-3 `<image>` placeholders each, drawn
from 64 PNG files of 28-448 px, and 5-400 words of text, so that some samples exceed cutoff_len and take
the two extra passes; a tiny Qwen2-VL is built offline. Then runs the real `vlpatch scan` on it with
`--workers 1` and `--workers 2`, alternating, and prints wall time, the ratio, and the peak resident
memory of the largest process (getrusage of the waited-for children).

With `--multi`, the multi-image, multi-turn corpus of `_multi_image.py` instead (issue 28: the scan's cost
a sample where most samples hold several large images).

    .venv/bin/python benchmarks/scan_scale.py [--samples 100000] [--rounds 1] [--multi --samples 600 --cutoff-len 512]
"""

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks._multi_image import multi_image_rows  # noqa: E402
from tests.fixtures.tiny_models import _register, build_tiny_qwen2vl, long_text  # noqa: E402


def dataset(directory: str, n: int, seed: int = 0) -> None:
    from PIL import Image

    rng = random.Random(seed)
    images = []
    for k in range(64):
        path = f"i{k}.png"
        Image.new("RGB", (28 * rng.randint(1, 16), 28 * rng.randint(1, 16)), (4 * k, 100, 150)).save(os.path.join(directory, path))
        images.append(path)
    rows = []
    for i in range(n):
        m = rng.randint(1, 3)
        text = long_text(rng.choice([5, 20, 60, 150, 400]), seed=i % 997)
        rows.append({
            "messages": [{"role": "user", "content": "<image> " * m + text}, {"role": "assistant", "content": "a red square"}],
            "images": [rng.choice(images) for _ in range(m)],
        })
    _register(directory, "scale", rows, {"messages": "messages", "images": "images"})


def multi_dataset(directory: str, n: int) -> None:
    """The multi-image, multi-turn corpus of `_multi_image.py` (issue 28): 0-6 images of 48-1600 px a sample."""
    rows = [{"messages": prompt + response, "images": images} for prompt, response, images in multi_image_rows(directory, n)]
    _register(directory, "scale", rows, {"messages": "messages", "images": "images"})


def run(args: list) -> tuple:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return seconds, max(peak, before) / 1024, json.loads(proc.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--cutoff-len", type=int, default=1024)
    ap.add_argument("--multi", action="store_true", help="the multi-image, multi-turn corpus (benchmarks/_multi_image.py)")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp = tempfile.mkdtemp(prefix="vlpatch-scale-")
    model = build_tiny_qwen2vl(os.path.join(tmp, "model"))
    t = time.perf_counter()
    (multi_dataset if a.multi else dataset)(tmp, a.samples)
    print(f"dataset: {a.samples} samples written in {time.perf_counter() - t:.0f}s ({tmp})", flush=True)
    cli = os.path.join(os.path.dirname(sys.executable), "vlpatch")
    base = [cli, "scan", "--dataset", "scale", "--dataset-dir", tmp, "--template", "qwen2_vl", "--model", model,
            "--cutoff-len", str(a.cutoff_len), "--json", "--no-progress"]
    times = {1: [], 2: [], "start": []}
    peaks = {1: 0.0, 2: 0.0}
    results = {}
    for _ in range(a.rounds):
        # start-up, which workers do not share: the interpreter, LLaMA-Factory's import, the tokenizer, the
        # dataset's loading; measured as a scan of its first sample
        seconds, _, _ = run(base + ["--workers", "1", "--limit", "1"])
        times["start"].append(seconds)
        print(f"start-up (a scan of one sample): {seconds:.1f}s", flush=True)
        for w in (1, 2):
            seconds, peak, result = run(base + ["--workers", str(w)])
            times[w].append(seconds)
            peaks[w] = max(peaks[w], peak)  # RUSAGE_CHILDREN only grows: the first run's peak may carry over
            results[w] = result
            print(f"workers {w}: {seconds:.0f}s", flush=True)
    same = results[1]["samples"] == results[2]["samples"]
    over = sum(1 for s in results[1]["samples"] if s["tokens"] and s["tokens"] > a.cutoff_len)
    m1, m2, m0 = statistics.median(times[1]), statistics.median(times[2]), statistics.median(times["start"])
    print(f"{a.samples} samples ({over} over cutoff_len {a.cutoff_len}), {os.cpu_count()} cores, {a.rounds} round(s)")
    print(f"workers 1: {m1:.0f}s ({1000 * m1 / a.samples:.2f} ms a sample); workers 2: {m2:.0f}s; ratio 1/2 = {m1 / m2:.2f}")
    print(f"after start-up ({m0:.1f}s): workers 1 {m1 - m0:.0f}s ({1000 * (m1 - m0) / a.samples:.2f} ms a sample); "
          f"workers 2 {m2 - m0:.0f}s; ratio 1/2 = {(m1 - m0) / (m2 - m0):.2f}")
    print(f"peak resident memory of the largest process: {peaks[1]:.0f} MiB (after the 1-worker run), {peaks[2]:.0f} MiB (after both)")
    print(f"identical per-sample results with 1 and 2 workers: {same}")


if __name__ == "__main__":
    main()
