"""Upstream-free unit tests of the collator layer's tensor rebuild (vlpatch/integrations/_collator.py):
after a decision, `rebuild` takes the kept positions of the kept rows out of every per-token tensor and
pads them again, and the media that leave go from the pixel tensors: Qwen-VL's flat patches with one grid
row per item (`drop_grid`, second_per_grid_ts beside the video grid), one entry per image (`per_image`:
Gemma 3, Pixtral's image_sizes; `drop_images`), one entry per row (`per_row`: Mllama) and one entry per
audio clip (`drop_entries`: Gemma 3n). Hand-made torch tensors; the processor, tokenizer, collator and
CollatorPatch are the smallest stand-ins carrying what the rebuild reads."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest

from vlpatch import core
from vlpatch.integrations import _collator

torch = pytest.importorskip("torch")

PAD = 7
L = 10


def _processor(name="Qwen2VLProcessor", pad=PAD, side="right"):
    """A processor stand-in: its class name is what the matrix options are looked up by."""
    proc = type(name, (), {})()
    proc.tokenizer = SimpleNamespace(pad_token_id=pad, padding_side=side)
    return proc


def _collate(processor, multiple=None, ignore_index=-100):
    return SimpleNamespace(processor=processor, pad_to_multiple_of=multiple, ignore_index=ignore_index)


def _site(**options):
    site = _collator.CollatorPatch("unit", "max_length", "filter_dataset(...)")
    if options:
        site.attach(SimpleNamespace(options=options))
    return site


def _tagged(rows, width=3, offset=0):
    """`rows` pixel rows, each filled with its own number (+ offset): which rows stay shows."""
    return (torch.arange(rows, dtype=torch.float32) + offset)[:, None].repeat(1, width)


def _tags(pixels):
    return pixels[:, 0].long().tolist()


def _text(B=2, mask_tail=(0, 3)):
    """Per-token tensors of a right-padded batch: ids 100*row + position + 1, row i's last mask_tail[i]
    positions padding; labels hide each row's first two tokens; token types 1 on every third token."""
    ids = torch.tensor([[100 * i + j + 1 for j in range(L)] for i in range(B)])
    mask = torch.ones(B, L, dtype=torch.long)
    for i, tail in enumerate(mask_tail[:B]):
        if tail:
            mask[i, L - tail :] = 0
            ids[i, L - tail :] = PAD
    labels = ids.clone()
    labels[:, :2] = -100
    labels[mask == 0] = -100
    types = (torch.arange(L) % 3 == 0).long().repeat(B, 1)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "token_type_ids": types}


def _qwen_batch():
    """A Qwen2-VL-shaped batch: 3 images (grids 1x2x2, 1x4x2, 1x2x4: 4 + 8 + 8 patch rows), 2 videos
    (2x2x2, 1x2x2: 8 + 4 rows) with Qwen2.5-VL's second_per_grid_ts."""
    batch = _text()
    batch.update(
        pixel_values=_tagged(20),
        image_grid_thw=torch.tensor([[1, 2, 2], [1, 4, 2], [1, 2, 4]]),
        pixel_values_videos=_tagged(12, offset=1000),
        video_grid_thw=torch.tensor([[2, 2, 2], [1, 2, 2]]),
        second_per_grid_ts=torch.tensor([1.0, 0.5]),
    )
    return batch


def _rebuild(batch, rows_kept, removed=None, totals=None, layout="grid", site=None, processor=None, pad_side=None, **collator):
    processor = processor or _processor()
    return (site or _site()).rebuild(_collate(processor, **collator), batch, rows_kept, removed or {},
                                     Counter(totals or {}), layout, torch, pad_side)


# --------------------------------------------------------------------------- per-token tensors


def test_kept_positions_in_order_right_padded_with_each_tensors_pad():
    before = _text()
    kept = [(0, [0, 1, 2, 6, 7, 8, 9]), (1, [0, 1, 2, 3, 4])]
    out = _rebuild(_text(), kept)
    assert out["input_ids"].shape == (2, 7)
    for j, (i, pos) in enumerate(kept):
        n = len(pos)
        for key in ("input_ids", "attention_mask", "labels", "token_type_ids"):
            assert out[key][j, :n].tolist() == before[key][i, pos].tolist(), (key, j)
        assert out["input_ids"][j, n:].tolist() == [PAD] * (7 - n)
        assert out["attention_mask"][j, n:].tolist() == [0] * (7 - n)
        assert out["labels"][j, n:].tolist() == [-100] * (7 - n)
        assert out["token_type_ids"][j, n:].tolist() == [0] * (7 - n)
    assert out["input_ids"].dtype == before["input_ids"].dtype


def test_left_padding_from_the_tokenizer_or_the_caller():
    before = _text()
    kept = [(0, [0, 1, 2, 6, 7, 8, 9]), (1, [0, 1, 2, 3, 4])]
    for out in (_rebuild(_text(), kept, processor=_processor(side="left")), _rebuild(_text(), kept, pad_side="left")):
        assert out["input_ids"][1].tolist() == [PAD, PAD] + before["input_ids"][1, :5].tolist()
        assert out["attention_mask"][1].tolist() == [0, 0, 1, 1, 1, 1, 1]
        assert out["labels"][1, :2].tolist() == [-100, -100]
        assert out["input_ids"][0].tolist() == before["input_ids"][0, [0, 1, 2, 6, 7, 8, 9]].tolist()
    right = _rebuild(_text(), kept, processor=_processor(side="left"), pad_side="right")
    assert right["input_ids"][1, 5:].tolist() == [PAD, PAD], "the caller's side over the tokenizer's"


def test_a_left_padded_batch_keeps_its_absolute_positions():
    batch = _text()
    batch["input_ids"][1] = torch.tensor([PAD] * 3 + [201 + j for j in range(7)])
    batch["attention_mask"][1] = torch.tensor([0] * 3 + [1] * 7)
    out = _rebuild(batch, [(0, list(range(10))), (1, [3, 4, 9])], processor=_processor(side="left"))
    assert out["input_ids"][1].tolist() == [PAD] * 7 + [201, 202, 207]
    assert out["input_ids"][0].tolist() == list(range(1, 11))


def test_padded_to_the_collators_multiple_and_its_ignore_index():
    kept = [(0, [0, 1, 2, 3, 4]), (1, [0, 1, 2])]
    assert _rebuild(_text(), kept, multiple=8)["input_ids"].shape == (2, 8)
    assert _rebuild(_text(), kept, multiple=1)["input_ids"].shape == (2, 5)
    assert _rebuild(_text(), kept, multiple=None)["input_ids"].shape == (2, 5)
    out = _rebuild(_text(), kept, ignore_index=-1)
    assert out["labels"][1, 3:].tolist() == [-1, -1]
    unset = _rebuild(_text(), kept, processor=_processor(pad=None))
    assert unset["input_ids"][1, 3:].tolist() == [0, 0], "no pad token: 0"


def test_a_dropped_row_leaves_every_per_token_tensor_and_extra_dims_follow():
    batch = _text(B=3, mask_tail=(0, 3, 1))
    batch["mrope"] = torch.arange(3 * L * 2).reshape(3, L, 2)  # a per-token tensor with a trailing dimension
    before = {k: v.clone() for k, v in batch.items()}
    out = _rebuild(batch, [(0, [0, 1, 2]), (2, [4, 5, 6, 7])])
    assert out["input_ids"].tolist() == [before["input_ids"][0, :3].tolist() + [PAD], before["input_ids"][2, 4:8].tolist()]
    assert out["mrope"].shape == (2, 4, 2)
    assert out["mrope"][1].tolist() == before["mrope"][2, 4:8].tolist() and out["mrope"][0, 3].tolist() == [0, 0]


# --------------------------------------------------------------------------- grid layout (Qwen2-VL, Qwen2.5-VL)


def test_grid_removed_image_and_video_leave_with_their_patch_rows_and_grid_rows():
    batch = _qwen_batch()
    out = _rebuild(batch, [(0, list(range(8))), (1, list(range(7)))], {"image": [1], "video": [0]}, {"image": 3, "video": 2})
    assert _tags(out["pixel_values"]) == [0, 1, 2, 3, *range(12, 20)]
    assert out["image_grid_thw"].tolist() == [[1, 2, 2], [1, 2, 4]]
    assert _tags(out["pixel_values_videos"]) == [1008, 1009, 1010, 1011]
    assert out["video_grid_thw"].tolist() == [[1, 2, 2]] and out["second_per_grid_ts"].tolist() == [0.5]
    assert _site().expected_items(out, "grid") == {"image": 2, "video": 1}
    assert int(out["image_grid_thw"].prod(-1).sum()) == len(out["pixel_values"])
    assert int(out["video_grid_thw"].prod(-1).sum()) == len(out["pixel_values_videos"])


def test_grid_media_stay_whole_when_only_text_is_cut():
    batch = _qwen_batch()
    media = {k: batch[k].clone() for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")}
    out = _rebuild(batch, [(0, [0, 1, 2, 3]), (1, list(range(7)))], {}, {"image": 3, "video": 2})
    for key, value in media.items():
        assert torch.equal(out[key], value), key


def test_grid_a_dropped_rows_media_leave_and_the_rest_stay_in_order():
    batch = _qwen_batch()
    # row 0 held images 0 and 1 and video 0: dropped, all leave
    out = _rebuild(batch, [(1, list(range(7)))], {"image": [0, 1], "video": [0]}, {"image": 3, "video": 2})
    assert out["input_ids"].shape == (1, 7)
    assert _tags(out["pixel_values"]) == list(range(12, 20)) and out["image_grid_thw"].tolist() == [[1, 2, 4]]
    assert _tags(out["pixel_values_videos"]) == list(range(1008, 1012)) and out["second_per_grid_ts"].tolist() == [0.5]


def test_grid_every_item_of_a_kind_gone_takes_its_keys_with_it():
    out = _rebuild(_qwen_batch(), [(0, list(range(8))), (1, list(range(7)))], {"image": [2, 0, 1, 1]}, {"image": 3, "video": 2})
    assert "pixel_values" not in out and "image_grid_thw" not in out
    assert len(out["pixel_values_videos"]) == 12 and out["second_per_grid_ts"].tolist() == [1.0, 0.5]
    out = _rebuild(_qwen_batch(), [(0, list(range(8)))], {"video": [0, 1]}, {"image": 3, "video": 2})
    assert not {"pixel_values_videos", "video_grid_thw", "second_per_grid_ts"} & set(out)
    assert len(out["pixel_values"]) == 20


def test_drop_grid_companions_of_every_form_and_a_mismatch_refused():
    for seconds in ([1.0, 0.5, 2.0], (1.0, 0.5, 2.0), torch.tensor([1.0, 0.5, 2.0])):
        batch = {"v": _tagged(3 * 4), "g": torch.tensor([[1, 2, 2]] * 3), "s": seconds, "other": [9]}
        _collator.drop_grid(batch, [1], "v", "g", ("s", "other", "absent"))
        assert _tags(batch["v"]) == [0, 1, 2, 3, 8, 9, 10, 11] and batch["g"].tolist() == [[1, 2, 2]] * 2
        assert type(batch["s"]) is type(seconds) and list(map(float, batch["s"])) == [1.0, 2.0]
        assert batch["other"] == [9], "a companion with another length is left alone"
    batch = {"v": _tagged(7), "g": torch.tensor([[1, 2, 2], [1, 2, 2]])}
    with pytest.raises(core.VLPatchError, match="v holds 7 patches, g says 8"):
        _collator.drop_grid(batch, [0], "v", "g")
    assert len(batch["v"]) == 7, "nothing taken out"


# --------------------------------------------------------------------------- per-image layout (Gemma 3, Pixtral)


def _per_image_batch(B=3, images=3, sizes=False):
    batch = _text(B=B, mask_tail=(0, 3, 1))
    batch["pixel_values"] = torch.arange(images, dtype=torch.float32)[:, None, None, None].repeat(1, 3, 4, 4)
    if sizes:
        batch["image_sizes"] = torch.tensor([[4, 4 + k] for k in range(images)])
    return batch


def test_per_image_removed_images_leave_pixel_values_and_image_sizes_never_per_token_tensors():
    # three rows and three images: the per-token tensors have as many entries as pixel_values
    batch = _per_image_batch(sizes=True)
    out = _rebuild(batch, [(0, list(range(10))), (1, list(range(7))), (2, list(range(9)))], {"image": [1]}, {"image": 3},
                   layout="per_image", processor=_processor("PixtralProcessor"))
    assert out["pixel_values"][:, 0, 0, 0].tolist() == [0.0, 2.0] and out["pixel_values"].shape[1:] == (3, 4, 4)
    assert out["image_sizes"].tolist() == [[4, 4], [4, 6]]
    assert out["attention_mask"].tolist() == [[1] * 10, [1] * 7 + [0] * 3, [1] * 9 + [0]], "every row stays whole"
    assert _site().expected_items(out, "per_image") == {"image": 2}


def test_per_image_a_dropped_rows_images_leave_and_no_empty_pixel_tensor_is_left():
    out = _rebuild(_per_image_batch(B=2, images=3), [(1, [0, 1, 2])], {"image": [0, 1]}, {"image": 3},
                   layout="per_image", processor=_processor("Gemma3Processor"))
    assert out["pixel_values"][:, 0, 0, 0].tolist() == [2.0] and out["token_type_ids"].shape == (1, 3)
    out = _rebuild(_per_image_batch(sizes=True), [(0, [0, 1])], {"image": [0, 1, 2]}, {"image": 3}, layout="per_image")
    assert "pixel_values" not in out and "image_sizes" not in out and out["input_ids"].shape == (1, 2)


def test_images_that_cannot_be_taken_out_are_refused():
    batch = _per_image_batch(images=3)
    with pytest.raises(core.VLPatchError, match="laid out 'per_image'"):  # pixel_values does not hold one entry per image
        _collator.drop_images(batch, [0], 4, "per_image", set(), torch)
    with pytest.raises(core.VLPatchError, match="laid out 'per_row'"):
        _collator.drop_images(batch, [0], 3, "per_row", set(), torch)
    assert len(batch["pixel_values"]) == 3


# --------------------------------------------------------------------------- per-row layout (Mllama)


def _mllama_batch(B=3, slots=2, tiles=4):
    batch = _text(B=B, mask_tail=(0, 3, 1))
    batch["pixel_values"] = torch.arange(B, dtype=torch.float32)[:, None, None, None, None, None].repeat(1, slots, tiles, 3, 2, 2)
    batch["aspect_ratio_ids"] = torch.tensor([[1, 2], [3, 0], [4, 5]])[:B]
    batch["aspect_ratio_mask"] = torch.ones(B, slots, tiles, dtype=torch.long)
    batch["cross_attention_mask"] = torch.arange(B * L * slots * tiles).reshape(B, L, slots, tiles)
    return batch


def test_per_row_a_dropped_row_takes_its_pixel_slots_and_cross_attention_follows_kept_tokens():
    batch = _mllama_batch()
    cross = batch["cross_attention_mask"].clone()
    out = _rebuild(batch, [(0, [0, 1, 2, 3]), (2, [1, 2, 3, 4, 5])], {"image": [2, 3]}, {"image": 5},
                   layout="per_row", processor=_processor("MllamaProcessor"))
    assert out["pixel_values"][:, 0, 0, 0, 0, 0].tolist() == [0.0, 2.0] and out["pixel_values"].shape[1:] == (2, 4, 3, 2, 2)
    assert out["aspect_ratio_ids"].tolist() == [[1, 2], [4, 5]] and out["aspect_ratio_mask"].shape == (2, 2, 4)
    assert out["cross_attention_mask"].shape == (2, 5, 2, 4)
    assert torch.equal(out["cross_attention_mask"][1], cross[2, 1:6]) and torch.equal(out["cross_attention_mask"][0, :4], cross[0, :4])
    assert not out["cross_attention_mask"][0, 4].any(), "padding attends to no image"
    assert _site().expected_items(out, "per_row") == {"image": 4}


def test_per_row_pixel_slots_stay_when_every_row_stays():
    batch = _mllama_batch()
    pixels, ids = batch["pixel_values"].clone(), batch["aspect_ratio_ids"].clone()
    out = _rebuild(batch, [(0, [0, 1]), (1, [0, 1, 2]), (2, [0])], {}, {"image": 5}, layout="per_row")
    assert torch.equal(out["pixel_values"], pixels) and torch.equal(out["aspect_ratio_ids"], ids)


# --------------------------------------------------------------------------- audio clips (Gemma 3n)


def _gemma3n(B=2, clips=2):
    site = _site(audio_tensors={"Gemma3nProcessor": ["input_features", "input_features_mask"]}, pixel_layout={"Gemma3nProcessor": "per_image"})
    batch = _text(B=B)
    # [clips, frames, mel] and [clips, frames]: with B == clips and frames == L the mask looks per-token
    batch["input_features"] = torch.arange(clips, dtype=torch.float32)[:, None, None].repeat(1, L, 4)
    batch["input_features_mask"] = torch.ones(clips, L, dtype=torch.bool)
    batch["input_features_mask"][1, 6:] = False
    return site, _processor("Gemma3nProcessor"), batch


def test_audio_removed_clips_leave_their_feature_entries_never_cut_as_tokens():
    site, proc, batch = _gemma3n()
    out = _rebuild(batch, [(0, [0, 1, 2, 3]), (1, [0, 1, 2, 3, 4])], {"audio": [0]}, {"audio": 2}, layout="per_image", site=site, processor=proc)
    assert out["input_ids"].shape == (2, 5)
    assert out["input_features"].shape == (1, L, 4) and out["input_features"][0, 0, 0].item() == 1.0
    assert out["input_features_mask"].tolist() == [[True] * 6 + [False] * 4], "the clip's own padding stays, masked"
    assert site.expected_items(out, "per_image", proc) == {"image": 0, "audio": 1}
    site, proc, batch = _gemma3n()
    out = _rebuild(batch, [(1, [0, 1])], {"audio": [1, 0]}, {"audio": 2}, layout="per_image", site=site, processor=proc)
    assert "input_features" not in out and "input_features_mask" not in out


def test_audio_entries_that_do_not_match_the_clips_are_refused():
    site, proc, batch = _gemma3n(clips=3)
    with pytest.raises(core.VLPatchError, match="Gemma3nProcessor's input_features holds 3 entries for 2 audio clip"):
        _collator.drop_entries(batch, [0], 2, ["input_features", "input_features_mask"], proc)
    assert len(batch["input_features"]) == 3
