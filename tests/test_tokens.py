"""Header-only visual-token arithmetic (vlpatch.tokens) against the real processors.

Sizes from 1x1 to 8000x8000 and extreme aspect ratios; images are built in memory in mode "1" (one bit
per pixel) so that even the large ones are cheap, exactly as LLaMA-Factory would receive them.
"""

import random

import pytest

from tests.conftest import require
from vlpatch.tokens import QwenVision, lf_qwen_image_tokens, smart_resize

EDGE = [(1, 1), (27, 27), (28, 28), (29, 57), (1, 8000), (8000, 1), (200, 1), (1, 199), (8000, 8000), (6000, 30), (224, 224), (1023, 769)]


def sizes(n, seed=0, top=8000):
    rng = random.Random(seed)
    out = list(EDGE)
    while len(out) < n:
        w = int(round(10 ** rng.uniform(0, 3.9)))
        h = int(round(10 ** rng.uniform(0, 3.9)))
        out.append((max(1, min(top, w)), max(1, min(top, h))))
    return out


def test_smart_resize_matches_transformers():
    require("transformers")
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as upstream

    for w, h in sizes(2000, seed=1):
        if max(w, h) / min(w, h) > 200:
            with pytest.raises(ValueError):
                upstream(h, w, 28, 56 * 56, 28 * 28 * 1280)
            continue
        for factor, lo, hi in ((28, 56 * 56, 28 * 28 * 1280), (32, 64 * 64, 32 * 32 * 1024)):
            try:
                expected = tuple(upstream(h, w, factor, lo, hi))
            except ValueError as exc:  # transformers < 4.53 refuses a side below the factor
                assert "must be larger than factor" in str(exc) and min(w, h) < factor, (w, h, exc)
                continue  # (LLaMA-Factory's own clamp never hands it such an image)
            assert smart_resize(h, w, factor, lo, hi) == expected, (w, h, factor)


@pytest.fixture(scope="module")
def llamafactory_qwen2vl_plugin(tiny_qwen2vl):
    """(the qwen2_vl template's mm_plugin, the tiny Qwen2-VL's processor, its `QwenVision` sizes, the pixel
    limits it was loaded with)."""
    require("llamafactory")
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments, ModelArguments
    from llamafactory.model import load_tokenizer

    limits = dict(image_max_pixels=768 * 768, image_min_pixels=32 * 32)
    loaded = load_tokenizer(ModelArguments(model_name_or_path=tiny_qwen2vl, **limits))
    template = get_template_and_fix_tokenizer(loaded["tokenizer"], DataArguments(template="qwen2_vl"))
    ip = loaded["processor"].image_processor
    size = getattr(ip, "size", None) or {}
    vision = QwenVision(
        patch_size=ip.patch_size,
        merge_size=ip.merge_size,
        min_pixels=size.get("shortest_edge", getattr(ip, "min_pixels", None)),
        max_pixels=size.get("longest_edge", getattr(ip, "max_pixels", None)),
    )
    return template.mm_plugin, loaded["processor"], vision, limits


def test_llamafactory_qwen_tokens_from_the_header_size(llamafactory_qwen2vl_plugin):
    """The number of <|image_pad|> tokens LLaMA-Factory's real qwen2_vl plugin writes, from the size alone."""
    from PIL import Image

    plugin, processor, vision, limits = llamafactory_qwen2vl_plugin
    checked = 0
    for w, h in sizes(150, seed=2):
        image = Image.new("1", (w, h))
        try:
            messages = plugin.process_messages([{"role": "user", "content": "<image>"}], [image], [], [], processor)
        except ValueError:  # upstream refuses the image (e.g. aspect ratio): so must the arithmetic
            with pytest.raises(ValueError):
                lf_qwen_image_tokens(w, h, vision, limits["image_max_pixels"], limits["image_min_pixels"])
            continue
        real = messages[0]["content"].count(plugin.image_token)
        assert lf_qwen_image_tokens(w, h, vision, limits["image_max_pixels"], limits["image_min_pixels"]) == real, (w, h)
        checked += 1
    assert checked >= 100
