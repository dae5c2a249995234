"""The multi-image, multi-turn corpus of the issue-28 benchmarks (`lf_multi_image_cost.py`, `scan_scale.py
--multi`): seeded samples of 1-3 turn pairs, 0-6 images in all (JPEG, 48 px to 1600 px, in any user turn),
user texts of 0-300 words, answers of 1-120."""

import os
import random
import tempfile

from tests.fixtures.tiny_models import long_text

HEADER = "llamafactory.header_tokens"  # the patch of header-only token counts (Qwen-VL): excluded, they are off

# A benchmark-only family: the tiny Gemma 3 with its processor's own image run, 256 soft tokens an image
# (Gemma3Processor's default, every Gemma 3 checkpoint's), where the tests' tiny one writes 16. Its
# vanilla tokenizes each image's run, as a real Gemma 3's does, so vlpatch's own cost is measured against
# the upstream work it adds to; the 16-token `gemma3` keeps measuring it against far less.
FULL_GEMMA3 = "gemma3_256"


def _register_families() -> None:
    import functools

    from tests.fixtures.tiny_processors import FAMILIES, gemma3

    FAMILIES.setdefault(FULL_GEMMA3, functools.partial(gemma3, image_seq_length=256))


SIZES = [(48, 48), (224, 224), (336, 252), (640, 480), (800, 800), (1024, 768), (1600, 1200)]


def multi_image_rows(directory: str, n: int, seed: int = 28) -> list:
    """[(prompt messages, response messages, image paths)]: `n` samples, the images written once."""
    from PIL import Image

    rng = random.Random(seed)
    files = []
    for k, size in enumerate(SIZES * 3):
        path = os.path.join(directory, f"img{k}.jpg")
        Image.new("RGB", size, (37 * k % 251, 90, 150)).save(path, quality=90)
        files.append(path)
    rows = []
    for i in range(n):
        turns = rng.randint(1, 3)
        count = rng.choice([0, 1, 2, 2, 3, 4, 5, 6])
        turn_of = sorted(rng.randrange(turns) for _ in range(count))
        messages, images = [], []
        for t in range(turns):
            words = long_text(rng.choice([rng.randint(0, 20), rng.randint(20, 300)]), seed=rng.randrange(1 << 30)).split()
            for _ in range(turn_of.count(t)):
                images.append(rng.choice(files))
                words.insert(rng.randint(0, len(words)), "<image>")
            messages.append({"role": "user", "content": " ".join(words) or "hi"})
            messages.append({"role": "assistant", "content": long_text(rng.randint(1, 120), seed=rng.randrange(1 << 30))})
        rows.append((messages[:-1], messages[-1:], images))
    return rows


def columns(rows) -> dict:
    """The rows as the columns LLaMA-Factory's converter gives `SupervisedDatasetProcessor`."""
    return {
        "_prompt": [p for p, _, _ in rows],
        "_response": [r for _, r, _ in rows],
        "_system": ["" for _ in rows],
        "_tools": ["" for _ in rows],
        "_images": [i or None for _, _, i in rows],
        "_videos": [None for _ in rows],
        "_audios": [None for _ in rows],
    }


def lf_setup(samples: int, prefix: str) -> tuple:
    """What the LLaMA-Factory benchmarks share: offline, one torch thread, vlpatch's log quiet, the corpus
    written into a new directory and vlpatch's report beside it. Returns (directory, rows, columns)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging

    import torch

    torch.set_num_threads(1)
    _register_families()
    logging.getLogger("vlpatch").setLevel(logging.ERROR)
    tmp = tempfile.mkdtemp(prefix=prefix)
    rows = multi_image_rows(tmp, samples)
    os.environ["VLPATCH_REPORT"] = os.path.join(tmp, "report.jsonl")
    return tmp, rows, columns(rows)
