"""Each covered LLaMA-Factory mm_plugin, with a real tiny processor of its family: vanilla cuts an image's
tokens, the patch keeps every image's tokens whole, and the media tokens are exactly those of the
uncut sample. The media tokens are named here by family, independently of vlpatch's own table."""

import inspect
from types import SimpleNamespace

import pytest

from tests.conftest import require
from tests.fixtures.tiny_models import long_text, write_image
from tests.fixtures.tiny_processors import FAMILIES, PREFIX_FAMILIES

pytestmark = pytest.mark.llamafactory


def build(family, tmp_path):
    require("llamafactory")
    try:
        tok, proc, template_name, media_tokens = {**FAMILIES, **PREFIX_FAMILIES}[family](str(tmp_path / "tok"))
    except (ImportError, AttributeError, TypeError) as exc:
        pytest.skip(f"this transformers cannot build a {family} processor: {exc!r}")
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments, ModelArguments
    from llamafactory.model.patcher import patch_processor

    model_args = ModelArguments(model_name_or_path=str(tmp_path / "tok"), image_max_pixels=112 * 112)
    if "config" in inspect.signature(patch_processor).parameters:
        # LLaMA-Factory <= 0.9.2 reads the image sequence length from the model config: the tiny
        # family's vision settings (56 px images, the processor's patch size)
        vision = SimpleNamespace(image_size=56, patch_size=getattr(proc, "patch_size", None) or 14, num_image_tokens=16)
        config = SimpleNamespace(model_type=family, vision_config=vision, vision_feature_select_strategy="default")
        patch_processor(proc, config, tok, model_args)
    else:
        patch_processor(proc, tok, model_args)
    template = get_template_and_fix_tokenizer(tok, DataArguments(template=template_name))
    return tok, proc, template, {tok.convert_tokens_to_ids(t) for t in media_tokens}


def encode(tok, proc, template, rows, cutoff):
    from llamafactory.data.processor import SupervisedDatasetProcessor
    from llamafactory.hparams import DataArguments

    data_args = DataArguments(cutoff_len=cutoff)
    p = SupervisedDatasetProcessor(template=template, tokenizer=tok, processor=proc, data_args=data_args)
    return p.preprocess_dataset(
        {
            "_prompt": [r[0] for r in rows],
            "_response": [r[1] for r in rows],
            "_system": ["" for _ in rows],
            "_tools": ["" for _ in rows],
            "_images": [r[2] for r in rows],
            "_videos": [None for _ in rows],
            "_audios": [None for _ in rows],
        }
    )


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_keeps_every_image_whole(family, tmp_path, patched):
    tok, proc, template, media = build(family, tmp_path)
    images = [write_image(str(tmp_path / f"{k}.png"), side=56 + 28 * k, seed=k) for k in range(2)]
    prompt = [{"role": "user", "content": long_text(60, 1) + " <image> middle words " + long_text(8, 2) + " <image> end"}]
    rows = [(prompt, [{"role": "assistant", "content": "fine answer"}], images)]

    full = encode(tok, proc, template, rows, 10**6)
    ids, labels = full["input_ids"][0], full["labels"][0]
    full_media = [t for t in ids if t in media]
    assert full_media, f"{family}: no media tokens in the encoded sample"
    target = len(ids) - next(i for i, lab in enumerate(labels) if lab != -100)
    last_media = max(i for i, t in enumerate(ids) if t in media)
    cutoff = last_media + target  # upstream's source slice stops just before the last media token

    vanilla = encode(tok, proc, template, rows, cutoff)["input_ids"][0]
    assert len([t for t in vanilla if t in media]) < len(full_media), "vanilla cuts into the media tokens"

    patched()
    out = encode(tok, proc, template, rows, cutoff)
    assert len(out["input_ids"]) == 1
    got = out["input_ids"][0]
    assert len(got) <= cutoff and len(out["labels"][0]) == len(got)
    assert [t for t in got if t in media] == full_media, "every image's tokens kept, whole and in order"


@pytest.mark.parametrize("family", sorted(PREFIX_FAMILIES))
def test_prefix_family_is_left_as_upstream_has_it(family, tmp_path, patched):
    tok, proc, template, media = build(family, tmp_path)
    image = write_image(str(tmp_path / "0.png"), side=56, seed=0)
    rows = [([{"role": "user", "content": "<image>" + long_text(80, 3)}], [{"role": "assistant", "content": "ok"}], [image])]
    n_media = len([t for t in encode(tok, proc, template, rows, 10**6)["input_ids"][0] if t in media])
    vanilla = encode(tok, proc, template, rows, n_media + 20)
    patched()
    out = encode(tok, proc, template, rows, n_media + 20)
    assert out["input_ids"] == vanilla["input_ids"] and out["labels"] == vanilla["labels"]
    assert len([t for t in out["input_ids"][0] if t in media]) == n_media
