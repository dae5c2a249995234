"""Downsized media for policy `shrink`, where a trainer re-reads media from its dataset rows.

LLaMA-Factory's collator reads every image and video again at training time (in every worker and rank,
and after a cached `tokenized_path` is reloaded), so a shrunk sample's row must say what to read: then
what the collator reads is what preprocessing counted.

An image named by a path becomes a *sized entry*: the same path with `#vlpatch-size=WxH` after it
(`sized`). Nothing is written at preprocessing; the patched reader (`read_sized`, in front of
LLaMA-Factory's `_regularize_images`) decodes the original and downsizes it to exactly that size when the
collator reads the row, as cheaply as upstream reads the original. Without vlpatch such an entry fails
loudly (no such file, the name says why), never with a silent mismatch.

Images given as bytes, frame lists (upstream checks that each frame exists) and video files become real
downsized files, named by their original (path, size and mtime, or its bytes) and the new size, written
once (atomically: a rank reading it never sees half a file) and not rewritten when present.

Images become PNG files. A video becomes an MPEG-4 file (PyAV, a codec every FFmpeg build has) of the
frames the trainer samples from the original (its own sampling function, passed in), at most
`frames` of them spread evenly, each downsized, at a frame rate that spans the original's duration: the
trainer then samples every frame of the new file, and timestamps (Qwen3-VL) still cover the original.
PIL and PyAV are imported only when a sample is shrunk.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import tempfile
from dataclasses import dataclass
from fractions import Fraction

from .. import core


SIZE_MARK = "#vlpatch-size="


def sized(item, size):
    """The entry naming `item` (a path, or a {"bytes": None, "path"} dict) read at `size` (a sized
    entry), or None where the entry names no file."""
    path = item.get("path") if isinstance(item, dict) and not item.get("bytes") else item
    if not isinstance(path, str) or unmark(path) is not None:
        return None
    entry = f"{path}{SIZE_MARK}{size[0]}x{size[1]}"
    return {**item, "path": entry} if isinstance(item, dict) else entry


def unmark(item):
    """(original path, (width, height)) of a sized entry, else None."""
    path = item.get("path") if isinstance(item, dict) and not item.get("bytes") else item
    if not isinstance(path, str) or SIZE_MARK not in path:
        return None
    original, _, size = path.rpartition(SIZE_MARK)
    w, _, h = size.partition("x")
    return (original, (int(w), int(h))) if w.isdigit() and h.isdigit() else None


def read_sized(items) -> list:
    """`items` with every sized entry replaced by its original, decoded and downsized to its size."""
    out = list(items)
    for k, item in enumerate(out):
        found = unmark(item)
        if found is not None:
            out[k] = downsize(found[0], found[1])
    return out


def downsize(source, size):
    """`source` (an entry or an image) decoded and resized to exactly `size`, as a PIL image."""
    from PIL import Image

    given = isinstance(source, Image.Image)
    with contextlib.nullcontext(source) if given else open_image(source) as im:
        if getattr(im, "format", None) == "JPEG" and not given:
            # libjpeg decodes at 1/2..1/8 scale by its inverse DCT (a proper low-pass, as libvips'
            # shrink-on-load): to the largest scale that is still at least `size`, then bicubic (not on
            # an image the caller passed in: draft() would shrink the caller's own image in place)
            im.draft(im.mode, tuple(size))
        im.load()
        if im.mode not in ("RGB", "RGBA", "L", "LA", "P", "I", "I;16", "1"):
            im = im.convert("RGB")
        return im.resize(tuple(size), Image.BICUBIC, reducing_gap=3.0)


def open_image(item):
    """A media-list entry (a path, bytes, a {"bytes", "path"} dict, an image) as a PIL image, opened
    lazily (pixels are decoded on first use); an image passed in is returned as it is."""
    from PIL import Image

    if isinstance(item, Image.Image):
        return item
    if isinstance(item, dict):
        item = item.get("bytes") or item.get("path")
    if isinstance(item, (bytes, bytearray)):
        item = io.BytesIO(item)
    return Image.open(item)


def image_size(item):
    """(width, height) of a media-list entry without decoding its pixels, or None."""
    found = unmark(item)
    if found is not None:
        return found[1]
    try:
        im = open_image(item)
        size = im.size
        if im is not item:
            im.close()
        return size
    except Exception:
        return None


def _write_once(folder: str, name: str, write) -> str:
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp{os.path.splitext(name)[1]}"
        write(tmp)
        os.replace(tmp, path)
    return path


def _identity(source) -> tuple:
    """(identity, name stem) of a file path or bytes: what makes a downsized copy the same one."""
    if isinstance(source, (str, os.PathLike)):
        st = os.stat(source)
        return f"{os.path.abspath(source)}|{st.st_size}|{st.st_mtime_ns}", os.path.splitext(os.path.basename(source))[0][:40]
    return hashlib.sha256(source).hexdigest(), "image"


def write_image(item, size, folder: str):
    """The entry for `item` downsized to `size`: a PNG file in `folder`, in the entry's own form (a path,
    a {"bytes", "path"} dict, bytes; an in-memory image stays one)."""
    from PIL import Image

    source = item.get("bytes") or item.get("path") if isinstance(item, dict) else item
    if isinstance(source, Image.Image):  # an in-memory image: the row holds the image itself
        return downsize(source, size)
    ident, stem = _identity(source)
    digest = hashlib.sha256(f"{ident}|{size[0]}x{size[1]}".encode()).hexdigest()[:16]
    # fast PNG: the file is read back once per epoch
    path = _write_once(folder, f"{stem}_{size[0]}x{size[1]}_{digest}.png", lambda tmp: downsize(source, size).save(tmp, format="PNG", compress_level=1))
    if isinstance(item, dict):
        return {**item, "bytes": None, "path": path}
    if isinstance(item, (bytes, bytearray)):
        with open(path, "rb") as fh:
            return fh.read()
    return path


@dataclass
class Video:
    """A video file as the trainer reads it: the stream's size, the frames it samples, its duration."""

    path: str
    width: int
    height: int
    indices: list  # the frame numbers the trainer samples (its own function)
    duration: float  # seconds the sampled frames span

    @property
    def frames(self) -> int:
        return len(self.indices)


def probe_video(path, sample_indices, fps: float):
    """`Video` for a file path, with `sample_indices(stream)` the trainer's sampling; None when it is
    not a readable video file (a list of frame images, a stream with no frames)."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        return None
    try:
        import av

        with av.open(os.fspath(path), "r") as container:
            stream = next((s for s in container.streams if s.type == "video"), None)
            if stream is None or not stream.frames:
                return None
            indices = [int(i) for i in sample_indices(stream)]
            duration = float(stream.duration * stream.time_base) if stream.duration is not None else 0.0
            if not indices:
                return None
            return Video(os.fspath(path), stream.width, stream.height, indices, duration or len(indices) / fps)
    except Exception:
        return None


def video_rate(video: Video, frames: int, fps: float) -> Fraction:
    """The frame rate at which `frames` frames span the original's duration, never above `fps` (the
    trainer samples at most duration x fps frames: then it samples every frame of the new file)."""
    rate = Fraction(frames) / Fraction(video.duration).limit_denominator(1000)
    return min(rate, Fraction(fps).limit_denominator(1000)).limit_denominator(1000)


def _encode(path: str, frames, size, rate: Fraction) -> None:
    import av

    with av.open(path, "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=rate)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = max(2_000_000, size[0] * size[1] * 30)  # near-lossless at these sizes
        for image in frames:
            out.mux(stream.encode(av.VideoFrame.from_image(image)))
        out.mux(stream.encode())


def blank_video(video: Video, size, frames: int, fps: float, folder: str) -> str:
    """A stand-in with the candidate's size, frame count and rate (token counts and timestamps depend on
    those, not on the pixels), for the search."""
    from PIL import Image

    count = len(core.pick_frames(video.frames, frames))
    rate = video_rate(video, count, fps)
    name = f"blank_{size[0]}x{size[1]}_{count}_{rate.numerator}-{rate.denominator}.mp4"
    return _write_once(folder, name, lambda tmp: _encode(tmp, [Image.new("RGB", size)] * count, size, rate))


def write_video(video: Video, size, frames: int, fps: float, folder: str) -> str:
    """The downsized copy: the sampled frames `core.pick_frames` keeps, resized to `size`, as an MPEG-4 file."""
    from PIL import Image

    picked = core.pick_frames(video.frames, frames)
    rate = video_rate(video, len(picked), fps)
    ident, stem = _identity(video.path)
    digest = hashlib.sha256(f"{ident}|{size[0]}x{size[1]}|{picked}|{rate}".encode()).hexdigest()[:16]

    def write(tmp):
        import av

        wanted = {video.indices[p] for p in picked}
        images = []
        with av.open(video.path, "r") as container:
            stream = next(s for s in container.streams if s.type == "video")
            for k, frame in enumerate(container.decode(stream)):  # numbered as the trainer numbers them
                if k in wanted:
                    images.append(frame.to_image().resize(size, Image.BICUBIC))
                    if len(images) == len(wanted):
                        break
        _encode(tmp, images, size, rate)

    return _write_once(folder, f"{stem}_{size[0]}x{size[1]}x{len(picked)}_{digest}.mp4", write)


def scratch() -> str:
    return tempfile.mkdtemp(prefix="vlpatch-shrink-")


def remove(folder: str | None) -> None:
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
