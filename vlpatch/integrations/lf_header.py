"""LLaMA-Factory: image token counts from image headers during dataset preprocessing.

Which symbols and versions: `compat_matrix.yaml` (patch `llamafactory.header_tokens`). How it hands over:

* `process_messages` of the listed plugin classes expands each `<image>` into its run of vision
  tokens, and to learn N it runs `_get_mm_inputs`: every image decoded, resized, normalised and
  patchified by the image processor, only for `image_grid_thw`. Inside `process_messages` (and only
  there: the collator's own `_get_mm_inputs` calls at training time are untouched) the wrapped
  `_get_mm_inputs` returns `image_grid_thw` computed from each image's header size instead:
  LLaMA-Factory's pre-resize and clamps (`vlpatch.tokens.lf_preprocess_size`) and the installed
  transformers' own `smart_resize`, with the geometry read off the real image processor.
* Everything else goes to upstream's own path, unchanged: videos or audios in the sample, an image
  that is not a plain file path, a format / mode / truncated file the header cannot vouch for
  (`vlpatch.tokens.image_header`), an image processor class not listed, `do_resize` off, or a size
  geometry that is ambiguous. Pixels are still computed by the collator at training time.
"""

from __future__ import annotations

import sys
from collections import Counter

from .. import tokens
from . import _media

_depth: list = []  # >0 while a wrapped process_messages runs in this process
stats: Counter = Counter()  # images counted from headers / handed to upstream (for the benchmark and doctor)
_options: dict = {}


def patch_options() -> dict:
    """The patch's matrix options: those of the applied patch, else the matrix's."""
    return _options or _matrix_options()


def geometry(image_processor, options: dict | None = None):
    """(patch, merge, min_pixels, max_pixels) as the installed image processor resizes, or None.
    `options`: the patch's matrix options (default: `patch_options()`)."""
    if options is None:
        options = patch_options()
    if type(image_processor).__name__ not in options.get("image_processors", ()):
        return None
    if not getattr(image_processor, "do_resize", True):
        return None
    patch, merge = getattr(image_processor, "patch_size", None), getattr(image_processor, "merge_size", None)
    size = getattr(image_processor, "size", None)
    lo = hi = None
    if size is not None:
        try:
            lo, hi = size["shortest_edge"], size["longest_edge"]
        except (KeyError, TypeError):
            lo = hi = None
    attr = (getattr(image_processor, "min_pixels", None), getattr(image_processor, "max_pixels", None))
    if lo is None:
        lo, hi = attr
    elif attr[0] is not None and attr != (lo, hi):
        return None  # which of the two resizes depends on the release: let upstream decide
    if not all(isinstance(x, int) and x > 0 for x in (patch, merge, lo, hi)):
        return None
    return patch, merge, lo, hi


def _matrix_options() -> dict:
    from .. import matrix

    return matrix.load().by_id("llamafactory.header_tokens").options


def grids(images, processor) -> list | None:
    """[1, grid_h, grid_w] per image from headers, or None: upstream must process these images."""
    return size_grids([_size(image) for image in images], processor)


def size_grids(sizes, processor) -> list | None:
    """[1, grid_h, grid_w] per (width, height) as the installed release and processor resize an image of
    that size, or None where the arithmetic cannot vouch for it (a None size among them, an unlisted
    processor, an ambiguous geometry)."""
    if not sizes or any(size is None for size in sizes):
        return None
    resize = geometry(getattr(processor, "image_processor", None))
    if resize is None:
        return None
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    patch, merge, lo, hi = resize
    defaults = _options.get("pre_resize_defaults", {})
    max_pixels = getattr(processor, "image_max_pixels", defaults.get("image_max_pixels"))
    min_pixels = getattr(processor, "image_min_pixels", defaults.get("image_min_pixels"))
    if max_pixels is None or min_pixels is None:
        return None
    out = []
    for size in sizes:
        try:
            w, h = tokens.lf_preprocess_size(size[0], size[1], max_pixels, min_pixels)
            rh, rw = smart_resize(h, w, factor=patch * merge, min_pixels=lo, max_pixels=hi)
        except ValueError:
            return None  # upstream fails on this image too, in its own words
        out.append([1, rh // patch, rw // patch])
    return out


def size_tokens(sizes, processor) -> list | None:
    """Vision tokens per (width, height) (`size_grids` over the merge), or None."""
    found = size_grids(sizes, processor)
    if found is None:
        return None
    merge = geometry(getattr(processor, "image_processor", None))[1]
    return [t * h * w // merge**2 for t, h, w in found]


def _size(image):
    """(width, height): a file's from its header, an in-memory image's own (policy shrink's stand-ins, a
    dataset of decoded images), a sized entry's (policy shrink, `_media`); None where upstream must look."""
    if isinstance(image, str):
        found = _media.unmark(image)
        return found[1] if found else tokens.image_header(image)
    pil = sys.modules.get("PIL.Image")
    if pil is not None and isinstance(image, pil.Image) and image.mode in tokens.HEADER_MODES:
        return image.size
    return None


def _messages(wrapped, instance, args, kwargs):
    _depth.append(1)
    try:
        return wrapped(*args, **kwargs)
    finally:
        _depth.pop()


def _mm_inputs(wrapped, instance, args, kwargs):
    if not _depth or type(instance).__name__ not in _options.get("plugins", ()):
        return wrapped(*args, **kwargs)
    names = ("images", "videos", "audios", "processor")
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kwargs.items() if k in names})
    images, processor = bound.get("images") or [], bound.get("processor")
    if bound.get("videos") or bound.get("audios") or not images:
        return wrapped(*args, **kwargs)
    found = grids(images, processor)
    if found is None:
        stats["upstream"] += len(images)
        return wrapped(*args, **kwargs)
    import torch

    stats["header"] += len(images)
    return {"image_grid_thw": torch.tensor(found, dtype=torch.long)}


def selftest(spec) -> tuple:
    """`vlpatch doctor`: the installed LLaMA-Factory's real qwen2_vl plugin expands `<image>` for three
    image files (PNG, JPEG, WebP; odd sizes) through the header path, and the counts equal what its
    own processor path (the real Qwen2VLImageProcessor) gives for the same files."""
    import tempfile
    import types

    from PIL import Image
    from transformers import Qwen2VLImageProcessor

    from llamafactory.data.mm_plugin import get_mm_plugin

    tmp = tempfile.mkdtemp(prefix="vlpatch-selftest-")
    paths = []
    for (w, h), ext in (((1023, 769), "png"), ((3000, 41), "jpg"), ((57, 57), "webp")):
        path = f"{tmp}/i{w}x{h}.{ext}"
        Image.new("RGB", (w, h), (10, 120, 200)).save(path)
        paths.append(path)
    holder = types.SimpleNamespace(image_processor=Qwen2VLImageProcessor(), image_max_pixels=768 * 768, image_min_pixels=32 * 32)
    plugin = get_mm_plugin("qwen2_vl", image_token="<|image_pad|>")
    before = stats["header"]
    expanded = [plugin.process_messages([{"role": "user", "content": "<image>"}], [p], [], [], holder)[0]["content"].count("<|image_pad|>") for p in paths]
    took = stats["header"] - before
    merge = holder.image_processor.merge_size**2
    real = [int(plugin._get_mm_inputs([p], [], [], holder)["image_grid_thw"][0].prod()) // merge for p in paths]
    ok = expanded == real and took == len(paths)
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)  # every doctor run left one in /tmp
    return ok, f"{took} of {len(paths)} images counted from headers, tokens {expanded} vs processor {real}"


WRAPPERS = {"messages": _messages, "mm_inputs": _mm_inputs}


def wrappers(spec, version=None) -> dict:
    _options.clear()
    _options.update(spec.options or {})
    return WRAPPERS


def details(spec) -> dict:
    return {"plugins": list(_options.get("plugins", ()))}
