"""Upstream-free unit tests of the downsized media for policy `shrink` (vlpatch/integrations/_media.py):
sized entries and their reader, downsizing, the entry kinds an image comes in, the files written once per
identity, the video helpers on a tiny MPEG-4 file (PyAV, as tests/fixtures/tiny_qwen3vl.py writes it) and
the scratch folder. PIL (and PyAV for the videos) only, as the module itself; images and videos are made
here, files in tmp_path."""

from __future__ import annotations

import io
import os
from fractions import Fraction

import pytest

from vlpatch import core
from vlpatch.integrations import _media

Image = pytest.importorskip("PIL.Image")


def _photo(path, size=(640, 480), fmt=None, mode="RGB"):
    """A small image with a left/right colour split (so a resize that flips or crops shows), saved to `path`."""
    im = Image.new(mode, size, (200, 30, 30) if mode == "RGB" else 0)
    if mode == "RGB":
        im.paste((30, 30, 200), (size[0] // 2, 0, size[0], size[1]))
    im.save(path, format=fmt)
    return str(path)


def _png_bytes(size=(64, 48)):
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 120, 240)).save(buf, format="PNG")
    return buf.getvalue()


def _every_frame(stream):
    return range(stream.frames)


# --------------------------------------------------------------------------- sized entries


def test_a_sized_entry_round_trips_its_path_and_size():
    entry = _media.sized("/data/img 1.jpg", (320, 240))
    assert entry == "/data/img 1.jpg#vlpatch-size=320x240"
    assert _media.unmark(entry) == ("/data/img 1.jpg", (320, 240))
    hub = {"bytes": None, "path": "/data/a.png", "other": 1}
    marked = _media.sized(hub, (8, 6))
    assert marked == {"bytes": None, "path": "/data/a.png#vlpatch-size=8x6", "other": 1} and hub["path"] == "/data/a.png"
    assert _media.unmark(marked) == ("/data/a.png", (8, 6))
    # the last mark counts: a path that itself holds the mark text is still read back whole
    assert _media.unmark("/d/x#vlpatch-size=1x1/y.png#vlpatch-size=5x7") == ("/d/x#vlpatch-size=1x1/y.png", (5, 7))


def test_only_a_path_entry_is_sized_and_a_sized_entry_is_not_sized_again():
    assert _media.sized(b"\x89PNG", (4, 4)) is None
    assert _media.sized({"bytes": b"\x89PNG", "path": "a.png"}, (4, 4)) is None  # its bytes are what is read
    assert _media.sized(Image.new("RGB", (4, 4)), (2, 2)) is None
    assert _media.sized(["a.png"], (2, 2)) is None
    assert _media.sized(_media.sized("a.png", (4, 4)), (2, 2)) is None
    for plain in ("a.png", "a#vlpatch-size=WxH", "a#vlpatch-size=12", {"bytes": None, "path": None}, None, 3):
        assert _media.unmark(plain) is None, plain


def test_read_sized_reads_each_sized_entry_at_its_size_and_leaves_the_rest(tmp_path):
    big = _photo(tmp_path / "big.png", (200, 100))
    other = Image.new("RGB", (9, 9))
    items = (big, _media.sized(big, (50, 25)), _media.sized({"bytes": None, "path": big}, (20, 40)), other)
    out = _media.read_sized(items)
    assert isinstance(out, list) and len(out) == 4
    assert out[0] == big and out[3] is other
    assert out[1].size == (50, 25) and out[2].size == (20, 40)
    assert out[1].getpixel((5, 12))[0] > 150 and out[1].getpixel((45, 12))[2] > 150, "left red, right blue: not mirrored"
    assert _media.read_sized([]) == []


def test_a_sized_entry_without_its_reader_fails_with_the_mark_in_the_name(tmp_path):
    entry = _media.sized(_photo(tmp_path / "a.png", (20, 20)), (10, 10))
    with pytest.raises(FileNotFoundError, match="vlpatch-size=10x10"):
        Image.open(entry)


# --------------------------------------------------------------------------- downsize and entry kinds


@pytest.mark.parametrize("size", [(64, 48), (48, 64), (1, 1), (800, 600)])
def test_downsize_gives_exactly_the_size_asked_for(tmp_path, size):
    path = _photo(tmp_path / "p.jpg", (640, 480), "JPEG")
    im = _media.downsize(path, size)
    assert isinstance(im, Image.Image) and im.size == size  # aspect is the caller's: not kept, not padded


def test_downsize_takes_every_entry_kind_and_keeps_the_picture(tmp_path):
    path = _photo(tmp_path / "p.png", (120, 60))
    with open(path, "rb") as fh:
        data = fh.read()
    in_memory = Image.open(path)
    in_memory.load()
    for source in (path, data, {"bytes": data, "path": None}, {"bytes": None, "path": path}, in_memory):
        im = _media.downsize(source, (40, 20))
        assert im.size == (40, 20), type(source)
        assert im.getpixel((5, 10))[0] > 150 and im.getpixel((35, 10))[2] > 150, type(source)
    assert in_memory.size == (120, 60), "a loaded image passed in is left as it was"


def test_downsize_of_a_jpeg_decodes_at_a_reduced_scale_then_resizes(tmp_path):
    path = _photo(tmp_path / "p.jpg", (800, 600), "JPEG")
    small = _media.downsize(path, (100, 75))
    assert small.size == (100, 75) and small.mode == "RGB"
    reference = Image.open(path).convert("RGB").resize((100, 75), Image.BICUBIC)
    diff = sum(abs(a - b) for a, b in zip(small.tobytes(), reference.tobytes())) / (100 * 75 * 3)
    assert diff < 6, f"the reduced-scale decode is the same picture (mean difference {diff:.2f})"


def test_downsize_converts_modes_a_resize_does_not_take(tmp_path):
    path = str(tmp_path / "cmyk.jpg")
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(path)
    assert _media.downsize(path, (10, 10)).mode == "RGB"
    grey = _photo(tmp_path / "grey.png", (40, 40), mode="L")
    assert _media.downsize(grey, (10, 10)).mode == "L"  # kept where resize takes it


def test_downsize_leaves_an_unloaded_image_passed_in_as_it_was(tmp_path):
    """A lazily opened JPEG passed in is not drafted (draft() would shrink the caller's own image)."""
    lazy = Image.open(_photo(tmp_path / "p.jpg", (640, 480), "JPEG"))
    assert _media.downsize(lazy, (100, 75)).size == (100, 75)
    assert lazy.size == (640, 480)


def test_open_image_and_image_size_on_every_entry_kind(tmp_path):
    path = _photo(tmp_path / "p.png", (30, 20))
    data = _png_bytes((64, 48))
    im = Image.new("RGB", (7, 5))
    assert _media.open_image(im) is im and _media.image_size(im) == (7, 5)
    for entry, size in ((path, (30, 20)), (data, (64, 48)), (bytearray(data), (64, 48)), ({"bytes": data, "path": path}, (64, 48)),
                        ({"bytes": None, "path": path}, (30, 20))):
        opened = _media.open_image(entry)
        assert isinstance(opened, Image.Image) and opened.size == size, type(entry)
        opened.close()
        assert _media.image_size(entry) == size, type(entry)
    # a sized entry's size is its mark (the file at that name does not exist)
    assert _media.image_size(_media.sized(path, (3, 2))) == (3, 2)
    assert _media.image_size({"bytes": None, "path": f"{path}#vlpatch-size=4x9"}) == (4, 9)


def test_an_unreadable_entry_fails_clearly_to_open_and_has_no_size(tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        _media.open_image(str(tmp_path / "missing.png"))
    with pytest.raises(Image.UnidentifiedImageError, match="junk.png"):
        _media.open_image(str(junk))
    with pytest.raises(Image.UnidentifiedImageError):
        _media.open_image(b"not an image at all")
    for entry in (str(junk), str(tmp_path / "missing.png"), b"nope", {"bytes": None, "path": None}, None, 42):
        assert _media.image_size(entry) is None, entry


# --------------------------------------------------------------------------- write_image


def test_write_image_writes_a_png_once_per_original_and_size(tmp_path):
    folder = str(tmp_path / "out")
    path = _photo(tmp_path / "photo.jpg", (300, 200), "JPEG")
    first = _media.write_image(path, (60, 40), folder)
    assert os.path.dirname(first) == folder and os.path.basename(first).startswith("photo_60x40_") and first.endswith(".png")
    with Image.open(first) as im:
        assert (im.format, im.size) == ("PNG", (60, 40))
    stamp = os.stat(first).st_mtime_ns
    os.utime(first, ns=(stamp - 10**9, stamp - 10**9))  # an older time: a rewrite would set a new one
    assert _media.write_image(path, (60, 40), folder) == first
    assert os.stat(first).st_mtime_ns == stamp - 10**9, "the same input again: not rewritten"
    assert _media.write_image({"bytes": None, "path": path}, (60, 40), folder) == {"bytes": None, "path": first}
    other = _media.write_image(path, (30, 20), folder)
    assert other != first and sorted(os.listdir(folder)) == sorted(os.path.basename(p) for p in (first, other))
    assert not [n for n in os.listdir(folder) if ".tmp" in n], "no temporary file left behind"


def test_write_image_names_a_changed_original_anew(tmp_path):
    folder = str(tmp_path / "out")
    path = _photo(tmp_path / "photo.png", (100, 100))
    first = _media.write_image(path, (10, 10), folder)
    stamp = os.stat(path).st_mtime_ns
    _photo(path, (100, 50))
    os.utime(path, ns=(stamp + 10**9, stamp + 10**9))
    second = _media.write_image(path, (10, 10), folder)
    assert second != first and os.path.isfile(first) and os.path.isfile(second)


def test_write_image_keeps_the_entrys_own_form(tmp_path):
    folder = str(tmp_path / "out")
    data = _png_bytes((64, 48))
    out = _media.write_image(data, (16, 12), folder)
    assert isinstance(out, bytes) and Image.open(io.BytesIO(out)).size == (16, 12)
    assert _media.write_image(bytes(data), (16, 12), folder) == out and len(os.listdir(folder)) == 1, "same bytes: same file"
    as_dict = _media.write_image({"bytes": data, "path": "ignored.png", "x": 1}, (16, 12), folder)
    assert as_dict["bytes"] is None and as_dict["x"] == 1 and os.path.basename(as_dict["path"]).startswith("image_16x12_")
    assert len(os.listdir(folder)) == 1, "a dict with the same bytes is the same file"
    im = Image.new("RGB", (64, 48))
    small = _media.write_image(im, (16, 12), folder)
    assert isinstance(small, Image.Image) and small.size == (16, 12) and im.size == (64, 48)
    assert _media.write_image({"bytes": None, "path": im}, (8, 6), folder).size == (8, 6)
    assert len(os.listdir(folder)) == 1, "an in-memory image writes no file"


# --------------------------------------------------------------------------- videos


@pytest.fixture
def tiny_video(tmp_path):
    """An 8-frame 32x32 MPEG-4 file at 4 fps (2 s), its red channel 30 * frame number."""
    pytest.importorskip("av")
    pytest.importorskip("numpy")
    from tests.fixtures.tiny_qwen3vl import write_video

    return write_video(str(tmp_path / "clip.mp4"), frames=8, fps=4, side=32)


def _red_of_each_frame(path):
    import av

    with av.open(path) as container:
        return [frame.to_ndarray(format="rgb24")[:, :, 0].mean() for frame in container.decode(video=0)]


def test_probe_video_reads_size_sampled_frames_and_duration(tiny_video, tmp_path):
    video = _media.probe_video(tiny_video, _every_frame, 4.0)
    assert (video.path, video.width, video.height, video.indices, video.frames) == (tiny_video, 32, 32, list(range(8)), 8)
    assert video.duration == pytest.approx(2.0)
    odd = _media.probe_video(tiny_video, lambda st: [0, 3, 7], 4.0)
    assert odd.indices == [0, 3, 7] and odd.frames == 3
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00" * 100)
    image = _photo(tmp_path / "frame.png", (16, 16))
    for not_a_video in (str(junk), str(tmp_path / "missing.mp4"), [image, image], image, None):
        assert _media.probe_video(not_a_video, _every_frame, 4.0) is None, not_a_video
    assert _media.probe_video(tiny_video, lambda st: [], 4.0) is None, "nothing sampled"
    assert _media.probe_video(tiny_video, lambda st: 1 / 0, 4.0) is None, "a sampling function that fails"


def test_video_rate_spans_the_duration_and_never_exceeds_fps():
    video = _media.Video("v.mp4", 32, 32, list(range(8)), 2.0)
    assert _media.video_rate(video, 4, 4.0) == Fraction(2)
    assert _media.video_rate(video, 8, 2.0) == Fraction(2), "capped at fps"
    assert _media.video_rate(video, 3, 30.0) == Fraction(3, 2)
    assert _media.video_rate(_media.Video("v.mp4", 32, 32, [0, 1, 2], 1 / 3), 2, 30.0) == Fraction(6)  # 1/3 s read exactly
    assert _media.video_rate(_media.Video("v.mp4", 32, 32, list(range(60)), 0.5), 30, 29.97) == Fraction(2997, 100)


def test_write_video_keeps_the_frames_pick_frames_keeps_at_the_new_size(tiny_video, tmp_path):
    folder = str(tmp_path / "out")
    video = _media.probe_video(tiny_video, _every_frame, 4.0)
    out = _media.write_video(video, (16, 16), 4, 4.0, folder)
    assert os.path.dirname(out) == folder and os.path.basename(out).startswith("clip_16x16x4_") and out.endswith(".mp4")
    again = _media.probe_video(out, _every_frame, 4.0)
    assert (again.width, again.height, again.frames) == (16, 16, 4)
    assert again.duration == pytest.approx(video.duration), "the copy spans the original's duration"
    picked = core.pick_frames(8, 4)
    assert picked == [0, 2, 5, 7]
    reds = _red_of_each_frame(out)
    assert all(abs(red - 30 * k) < 12 for red, k in zip(reds, picked)), (reds, picked)
    stamp = os.stat(out).st_mtime_ns
    assert _media.write_video(video, (16, 16), 4, 4.0, folder) == out and os.stat(out).st_mtime_ns == stamp, "written once"


def test_write_video_samples_through_the_trainers_indices(tiny_video, tmp_path):
    video = _media.probe_video(tiny_video, lambda st: [1, 3, 5, 7], 4.0)
    out = _media.write_video(video, (16, 16), 2, 4.0, str(tmp_path / "out"))
    # pick_frames(4, 2) keeps sampled positions 0 and 3: the original's frames 1 and 7
    reds = _red_of_each_frame(out)
    assert len(reds) == 2 and abs(reds[0] - 30) < 12 and abs(reds[1] - 210) < 12, reds


def test_blank_video_has_the_candidates_size_frames_and_rate(tiny_video, tmp_path):
    folder = str(tmp_path / "scratch")
    video = _media.probe_video(tiny_video, _every_frame, 4.0)
    blank = _media.blank_video(video, (16, 8), 3, 4.0, folder)
    assert os.path.basename(blank) == "blank_16x8_3_3-2.mp4"
    probed = _media.probe_video(blank, _every_frame, 4.0)
    assert (probed.width, probed.height, probed.frames) == (16, 8, 3)
    assert probed.duration == pytest.approx(2.0)
    assert max(_red_of_each_frame(blank)) < 12, "black frames"
    assert _media.blank_video(video, (16, 8), 3, 4.0, folder) == blank and len(os.listdir(folder)) == 1
    more = _media.blank_video(video, (16, 8), 20, 4.0, folder)
    assert _media.probe_video(more, _every_frame, 4.0).frames == 8, "never more frames than the original's sampled"


# --------------------------------------------------------------------------- scratch


def test_scratch_is_a_fresh_folder_and_remove_takes_it_whole():
    first, second = _media.scratch(), _media.scratch()
    try:
        assert first != second and os.path.isdir(first) and os.path.basename(first).startswith("vlpatch-shrink-")
        assert not os.listdir(first)
        os.makedirs(os.path.join(first, "a", "b"))
        with open(os.path.join(first, "a", "b", "f.png"), "wb") as fh:
            fh.write(b"x")
    finally:
        _media.remove(first)
        _media.remove(second)
    assert not os.path.exists(first) and not os.path.exists(second)
    _media.remove(first)  # gone already: no error
    _media.remove(None)
    _media.remove("")
