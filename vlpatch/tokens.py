"""Visual-token arithmetic from an image's size alone: no decoding, no heavy imports.

For Qwen2-VL-style dynamic resolution the number of vision tokens follows from the image's width and
height: LLaMA-Factory's own pre-resize (`image_max_pixels` / `image_min_pixels`, then the Qwen-VL
plugin's minimum-side and aspect clamps), then the image processor's `smart_resize` to multiples of
patch * merge inside [min_pixels, max_pixels], then grid_h * grid_w / merge^2. Every float operation
mirrors upstream's own, in the same order, so the result is exact (tests compare with the real
processors). An image's size is in its header: `PIL.Image.open(path).size` reads no pixels.
LLaMA-Factory does not apply EXIF orientation, so the header size is the size that counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def lf_preprocess_size(width: int, height: int, max_pixels: int, min_pixels: int, min_side: int | None = 28):
    """LLaMA-Factory's `_preprocess_image` on a size (BasePlugin, then the Qwen-VL plugin's clamps).

    Raises ValueError where upstream's resize does: a side shrunk to 0 px (an extreme strip)."""
    if width * height > max_pixels:
        factor = math.sqrt(max_pixels / (width * height))
        width, height = int(width * factor), int(height * factor)
        if width <= 0 or height <= 0:
            raise ValueError(f"a side shrinks to 0 px ({width}x{height}) under image_max_pixels {max_pixels}")
    if width * height < min_pixels:
        factor = math.sqrt(min_pixels / (width * height))
        width, height = int(width * factor), int(height * factor)
    if min_side is not None:
        if min(width, height) < min_side:
            width, height = max(width, min_side), max(height, min_side)
        if width / height > 200:
            width, height = height * 180, height
        if height / width > 200:
            width, height = width, width * 180
    return width, height


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int):
    """transformers' Qwen2-VL `smart_resize`: (height, width) rounded to multiples of `factor`.

    Releases before 4.53 also refuse a side shorter than `factor`; LLaMA-Factory's Qwen-VL plugin
    clamps every side to at least 28 first, so its images never reach that check.
    """
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class QwenVision:
    """A Qwen-VL image processor's geometry (Qwen2-VL / Qwen2.5-VL: patch 14; Qwen3-VL: patch 16)."""

    patch_size: int = 14
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280

    def grid(self, width: int, height: int) -> tuple:
        h, w = smart_resize(height, width, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels)
        return 1, h // self.patch_size, w // self.patch_size

    def image_tokens(self, width: int, height: int) -> int:
        """Tokens of one image between its boundary tokens."""
        t, gh, gw = self.grid(width, height)
        return t * gh * gw // (self.merge_size**2)


def lf_qwen_image_tokens(width: int, height: int, vision: QwenVision, image_max_pixels: int, image_min_pixels: int) -> int:
    """Tokens LLaMA-Factory's Qwen-VL plugin writes for an image of this header size."""
    w, h = lf_preprocess_size(width, height, image_max_pixels, image_min_pixels)
    return vision.image_tokens(w, h)


# ------------------------------------------------------------------ image headers
# Formats whose end marker proves the file was written to the end (a truncated file falls back to the
# trainer's own path, which decodes it and fails or reports exactly as without the shortcut).
HEADER_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
# Modes the trainers convert to RGB before the processor sees them (the size is unchanged).
HEADER_MODES = frozenset(
    ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "I;16", "I;16B", "I;16L", "I", "F", "LAB"]
)


def _tail_intact(path: str, fmt: str) -> bool:
    import os

    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        if fmt == "WEBP":
            head = fh.read(12)
            return head[:4] == b"RIFF" and int.from_bytes(head[4:8], "little") + 8 == size
        fh.seek(max(0, size - 12))
        tail = fh.read()
    if fmt == "PNG":
        return tail == b"\x00\x00\x00\x00IEND\xaeB`\x82"
    if fmt == "JPEG":
        return tail.endswith(b"\xff\xd9")
    if fmt == "GIF":
        return tail.endswith(b"\x3b")
    return False


_headers: dict = {}  # (path, mtime_ns, size) -> image_header's answer: a file read once per version of it


def image_header(path) -> tuple | None:
    """(width, height) of an image file from its header (no pixel is decoded), or None when the
    shortcut cannot vouch for it: not a plain file path, another format, an unusual mode, a file whose
    end marker is missing (truncated), or anything PIL cannot open. Remembered per file version (its
    modification time and size), as a dataset names the same files again and again."""
    if not isinstance(path, str):  # what every trainer release opens as a path (0.9.2: str only)
        return None
    import os

    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (path, st.st_mtime_ns, st.st_size)
    if key in _headers:
        return _headers[key]
    if len(_headers) >= 65536:
        _headers.clear()
    _headers[key] = found = _read_header(path)
    return found


def _read_header(path: str) -> tuple | None:
    try:
        from PIL import Image

        with Image.open(path) as im:  # lazy: reads the header only
            fmt, mode, size = im.format, im.mode, im.size
        if fmt not in HEADER_FORMATS or mode not in HEADER_MODES or not _tail_intact(path, fmt):
            return None
        return size
    except Exception:
        return None
