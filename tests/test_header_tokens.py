"""Header-only image token counts (patch `llamafactory.header_tokens`) against LLaMA-Factory's real path.

On a generated corpus of image files (tests/fixtures/corpus.py; 600 in CI on the newest release,
2,000 with VLPATCH_CORPUS_FILES=2000) the real qwen2_vl plugin's
`process_messages`, which LLaMA-Factory's dataset processors call for every sample, must give exactly
the same messages (the same number of <|image_pad|> tokens), or the same error, with the patch as
without it, under LLaMA-Factory's default image limits and under small ones. Most images must really
take the header path (the test would prove nothing if everything fell back), and every truncated file
must fall back. Then whole samples: input_ids of the real SupervisedDatasetProcessor, patched and
vanilla, are equal.
"""

from __future__ import annotations

import os

import pytest

from tests.conftest import is_newest, require
from tests.fixtures.corpus import shared_corpus

LIMITS = [  # (image_max_pixels, image_min_pixels): LLaMA-Factory's defaults, then small ones
    (768 * 768, 32 * 32),
    (128 * 128, 56 * 56),
]


@pytest.fixture(scope="module")
def corpus():
    require("PIL")
    # 600 files on the newest tested LLaMA-Factory, 300 from the same generator (edge sizes, 30 truncated) on
    # older ones: CI time. VLPATCH_CORPUS_FILES=2000 runs the corpus docs/scan.md's figures come from.
    n = int(os.environ.get("VLPATCH_CORPUS_FILES") or (600 if is_newest("llamafactory") else 300))
    return shared_corpus(n)


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen3_vl"])
def llamafactory_processor(request, tiny_qwen2vl, tmp_path_factory):
    """(template, tokenizer, processor) of a real processor: the tiny Qwen2-VL model's (also what
    Qwen2.5-VL uses: the same plugin and image processor class), or a tiny Qwen3-VL one (patch 16)."""
    require("llamafactory")
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments, ModelArguments
    from llamafactory.model import load_tokenizer

    if request.param == "qwen2_vl":
        loaded = load_tokenizer(ModelArguments(model_name_or_path=tiny_qwen2vl))
        tok, proc = loaded["tokenizer"], loaded["processor"]
    else:
        from tests.fixtures import tiny_processors

        try:
            fam = tiny_processors.qwen3_vl(str(tmp_path_factory.mktemp("qwen3")))
            tok, proc = fam.tok, fam.proc
        except AttributeError as exc:  # transformers before Qwen3-VL
            pytest.skip(f"this transformers cannot build a qwen3_vl processor: {exc!r}")
    try:
        template = get_template_and_fix_tokenizer(tok, DataArguments(template=request.param))
    except ValueError as exc:  # LLaMA-Factory before its qwen3_vl template
        pytest.skip(f"this LLaMA-Factory has no {request.param} template: {exc}")
    return template, tok, proc


def expand(plugin, processor, path):
    try:
        out = plugin.process_messages([{"role": "user", "content": "<image>"}], [path], [], [], processor)
        return ("ok", out[0]["content"])
    except Exception as exc:  # upstream's own refusal (truncated file, aspect ratio): must be the same
        return ("error", type(exc).__name__)


@pytest.mark.heavy
@pytest.mark.parametrize("limits", LIMITS, ids=["lf-defaults", "small"])
def test_corpus_token_counts_equal_the_processor_path(llamafactory_processor, corpus, limits, patched):
    import vlpatch
    from vlpatch.integrations import lf_header

    template, _, processor = llamafactory_processor
    processor.image_max_pixels, processor.image_min_pixels = limits  # as LLaMA-Factory's patch_processor sets them
    plugin = template.mm_plugin
    vlpatch.revert()
    vanilla = [expand(plugin, processor, path) for path, _, _ in corpus]
    patched(patches=["llamafactory.header_tokens"])
    lf_header.stats.clear()
    header = [expand(plugin, processor, path) for path, _, _ in corpus]
    stats = dict(lf_header.stats)
    mismatches = [(corpus[i][1:], v, h) for i, (v, h) in enumerate(zip(vanilla, header)) if v != h]
    assert not mismatches, mismatches[:5]
    # the header path really ran: every intact file took it, every truncated one fell back
    truncated = 30
    assert stats == {"header": len(corpus) - truncated, "upstream": truncated}, stats
    assert type(plugin).__name__ in ("Qwen2VLPlugin", "Qwen3VLPlugin")
    # and the arithmetic `vlpatch scan` uses for its image_max_pixels recommendation, per image
    from vlpatch import tokens

    patch, merge, lo, hi = lf_header.geometry(processor.image_processor, lf_header.patch_options())
    vision = tokens.QwenVision(patch, merge, lo, hi)
    for (path, size, _), (state, content) in zip(corpus, vanilla):
        if state == "ok":
            expected = content.count(plugin.image_token)
            assert tokens.lf_qwen_image_tokens(*size, vision, *limits) == expected, (path, size)
    kinds = {k.split("/")[0] for _, _, k in corpus}
    assert kinds == {"PNG", "JPEG", "WEBP", "GIF"}
    assert sum(v[0] == "ok" for v in vanilla) >= len(corpus) - truncated - 10


def test_preprocessed_samples_equal_vanilla(llamafactory_processor, corpus, tmp_path, patched):
    """input_ids / labels of LLaMA-Factory's real SupervisedDatasetProcessor, patched vs vanilla, for
    samples of one to three images that fit cutoff_len."""
    import vlpatch
    from llamafactory.data.processor import SupervisedDatasetProcessor
    from llamafactory.hparams import DataArguments

    template, tokenizer, processor = llamafactory_processor
    processor.image_max_pixels, processor.image_min_pixels = LIMITS[1]
    data_args = DataArguments(template=template.mm_plugin.__class__.__name__ == "Qwen3VLPlugin" and "qwen3_vl" or "qwen2_vl", cutoff_len=100_000)
    proc = SupervisedDatasetProcessor(template=template, tokenizer=tokenizer, processor=processor, data_args=data_args)
    good = [p for p, _, _ in corpus[:-30]]
    n = 120
    images = [good[(7 * k) % len(good) : (7 * k) % len(good) + 1 + k % 3] for k in range(n)]
    batch = {
        "_prompt": [[{"role": "user", "content": "<image>" * len(imgs) + " describe"}] for imgs in images],
        "_response": [[{"role": "assistant", "content": "a flat colour"}] for _ in images],
        "_system": [""] * n,
        "_tools": [""] * n,
        "_images": images,
        "_videos": [None] * n,
        "_audios": [None] * n,
    }
    vlpatch.revert()
    vanilla = proc.preprocess_dataset(batch)
    patched(patches=["llamafactory.header_tokens"])
    header = proc.preprocess_dataset(batch)
    assert len(vanilla["input_ids"]) == n
    assert header["input_ids"] == vanilla["input_ids"] and header["labels"] == vanilla["labels"]


def test_an_image_shrunk_to_nothing_fails_as_upstream_fails(llamafactory_processor, tmp_path, patched):
    # an 8000x1 strip under image_max_pixels 4000: LLaMA-Factory's pre-resize makes it 0 px high and
    # upstream refuses it; the header path must hand it to upstream, not fail in its own arithmetic
    from PIL import Image

    import vlpatch
    from vlpatch.integrations import lf_header

    template, _, processor = llamafactory_processor
    processor.image_max_pixels, processor.image_min_pixels = 4000, 32 * 32
    strip = str(tmp_path / "strip.png")
    Image.new("L", (8000, 1)).save(strip)
    vlpatch.revert()
    vanilla = expand(template.mm_plugin, processor, strip)
    patched(patches=["llamafactory.header_tokens"])
    lf_header.stats.clear()
    assert vanilla[0] == "error" and expand(template.mm_plugin, processor, strip) == vanilla
    assert lf_header.stats == {"upstream": 1}
