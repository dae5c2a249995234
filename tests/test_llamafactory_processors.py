"""LLaMA-Factory's real dataset processors, per stage, vanilla against patched.

The processors, template, mm_plugin and Qwen2-VL processor are the installed LLaMA-Factory and
transformers; only the model directory is tiny and built offline.
"""

import json

import pytest

from tests.conftest import require
from tests.fixtures.chat_frame import QWEN_SYSTEM_FRAME, qwen_frame
from tests.fixtures.tiny_models import IMAGE_TOKENS, long_text, write_image

pytestmark = pytest.mark.llamafactory
CUTOFF = 128


@pytest.fixture(scope="module")
def llamafactory_qwen2vl(tiny_qwen2vl, tmp_path_factory):
    """LLaMA-Factory's qwen2_vl template, the tiny Qwen2-VL's tokenizer and processor (images at most 224 px
    square), three test images, the image token ids, and `processor(cls_name, **data_kwargs)`: one of
    LLaMA-Factory's real dataset processors on them."""
    require("llamafactory")
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments, ModelArguments
    from llamafactory.model import load_tokenizer

    model_args = ModelArguments(model_name_or_path=tiny_qwen2vl, image_max_pixels=224 * 224)
    loaded = load_tokenizer(model_args)
    tok, proc = loaded["tokenizer"], loaded["processor"]
    template = get_template_and_fix_tokenizer(tok, DataArguments(template="qwen2_vl", cutoff_len=CUTOFF))
    d = tmp_path_factory.mktemp("imgs")
    images = [write_image(str(d / f"i{k}.png"), seed=k) for k in range(3)]

    class LF:
        pass

    out = LF()
    out.tok, out.proc, out.template, out.images = tok, proc, template, images
    out.pad = tok.convert_tokens_to_ids("<|image_pad|>")
    out.start = tok.convert_tokens_to_ids("<|vision_start|>")
    out.end = tok.convert_tokens_to_ids("<|vision_end|>")

    def processor(cls_name, **data_kwargs):
        import llamafactory.data.processor as P

        data_args = DataArguments(template="qwen2_vl", cutoff_len=data_kwargs.pop("cutoff_len", CUTOFF), **data_kwargs)
        return getattr(P, cls_name)(template=template, tokenizer=tok, processor=proc, data_args=data_args)

    out.processor = processor
    return out


def lf_status(rows):
    return next(row for row in rows if row["id"] == "llamafactory.truncation")


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def batch(rows):
    """rows: (prompt messages, response messages, images); LLaMA-Factory's aligned columns."""
    return {
        "_prompt": [r[0] for r in rows],
        "_response": [r[1] for r in rows],
        "_system": ["" for _ in rows],
        "_tools": ["" for _ in rows],
        "_images": [list(r[2]) or None for r in rows],
        "_videos": [None for _ in rows],
        "_audios": [None for _ in rows],
    }


def runs_whole(llamafactory_qwen2vl, ids, n_images):
    """Every image run is <|vision_start|> + 64 pads + <|vision_end|>, and there are n_images of them."""
    runs, i = 0, 0
    while i < len(ids):
        if ids[i] == llamafactory_qwen2vl.start:
            j = i + 1
            while j < len(ids) and ids[j] == llamafactory_qwen2vl.pad:
                j += 1
            assert j - i - 1 == IMAGE_TOKENS and j < len(ids) and ids[j] == llamafactory_qwen2vl.end, f"run at {i} cut: {j - i - 1} pads"
            runs += 1
            i = j
        elif ids[i] == llamafactory_qwen2vl.pad:
            raise AssertionError(f"stray image tokens at {i}")
        i += 1
    assert ids.count(llamafactory_qwen2vl.pad) == IMAGE_TOKENS * n_images
    assert runs == n_images


def sft_rows(llamafactory_qwen2vl):
    return [
        ([user(long_text(150, 1) + " <image>")], [assistant("a red square")], llamafactory_qwen2vl.images[:1]),  # cut lands in the run
        ([user("<image> short")], [assistant("fits")], llamafactory_qwen2vl.images[1:2]),  # fits: untouched
        ([user(long_text(150, 2))], [assistant(long_text(100, 3))], []),  # text only, cut
    ]


def test_vanilla_supervised_cuts_through_the_image(llamafactory_qwen2vl):
    out = llamafactory_qwen2vl.processor("SupervisedDatasetProcessor").preprocess_dataset(batch(sft_rows(llamafactory_qwen2vl)))
    assert out["input_ids"][0].count(llamafactory_qwen2vl.pad) < IMAGE_TOKENS, "upstream keeps a partial or no image run"


def test_patched_supervised(llamafactory_qwen2vl, patched, tmp_path):
    vanilla = llamafactory_qwen2vl.processor("SupervisedDatasetProcessor").preprocess_dataset(batch(sft_rows(llamafactory_qwen2vl)))
    report_path = tmp_path / "r.jsonl"
    patched(report=str(report_path))
    out = llamafactory_qwen2vl.processor("SupervisedDatasetProcessor").preprocess_dataset(batch(sft_rows(llamafactory_qwen2vl)))
    assert len(out["input_ids"]) == 3
    for ids, labels, mask, imgs in zip(out["input_ids"], out["labels"], out["attention_mask"], out["images"]):
        assert len(ids) <= CUTOFF and len(labels) == len(ids) == len(mask)
        runs_whole(llamafactory_qwen2vl, ids, len(imgs or []))
    assert out["input_ids"][1] == vanilla["input_ids"][1] and out["labels"][1] == vanilla["labels"][1]
    assert out["input_ids"][2] == vanilla["input_ids"][2], "text-only samples are cut exactly as upstream cuts them"
    # the response survives: its labels are kept
    assert [t for t in out["labels"][0] if t != -100] == [t for t in vanilla["labels"][0] if t != -100]
    rows = [json.loads(x) for x in report_path.read_text().splitlines()]
    assert [(r["batch_position"], r["action"]) for r in rows] == [(0, "truncated"), (2, "truncated")]
    assert rows[0]["media_tokens"] == rows[0]["media_tokens_after"] == IMAGE_TOKENS + 2


@pytest.mark.parametrize("mask_history,train_on_prompt", [(False, False), (True, False), (False, True)])
def test_patched_multiturn_keeps_upstream_semantics(llamafactory_qwen2vl, patched, mask_history, train_on_prompt):
    rows = [
        (
            [user(long_text(30, 4) + " <image>"), assistant(long_text(20, 5)), user(long_text(40, 6) + " <image> why")],
            [assistant(long_text(25, 7))],
            llamafactory_qwen2vl.images[:2],
        ),
        ([user("<image> a"), assistant("b"), user("<image> c")], [assistant("d")], llamafactory_qwen2vl.images[:2]),
    ]
    kw = dict(mask_history=mask_history, train_on_prompt=train_on_prompt, cutoff_len=400)
    vanilla = llamafactory_qwen2vl.processor("SupervisedDatasetProcessor", **kw).preprocess_dataset(batch(rows))
    patched()
    out = llamafactory_qwen2vl.processor("SupervisedDatasetProcessor", **kw).preprocess_dataset(batch(rows))
    assert out["input_ids"][1] == vanilla["input_ids"][1] and out["labels"][1] == vanilla["labels"][1]
    for budget in (400, 250, 200, 160):
        kw["cutoff_len"] = budget
        out = llamafactory_qwen2vl.processor("SupervisedDatasetProcessor", **kw).preprocess_dataset(batch(rows))
        for ids, labels, imgs in zip(out["input_ids"], out["labels"], out["images"]):
            assert len(ids) <= budget and len(labels) == len(ids)
            runs_whole(llamafactory_qwen2vl, ids, len(imgs))
            # labels are upstream's labels at the kept positions: every label is IGNORE or the token itself
            assert all(lab in (-100, tok) for lab, tok in zip(labels, ids))


def test_patched_packed_supervised(llamafactory_qwen2vl, patched):
    rows = sft_rows(llamafactory_qwen2vl) + [([user(long_text(5, 9) + " <image>")], [assistant("x")], llamafactory_qwen2vl.images[2:])]
    patched()
    out = llamafactory_qwen2vl.processor("PackedSupervisedDatasetProcessor", cutoff_len=CUTOFF).preprocess_dataset(batch(rows))
    n_images = sum(len(x or []) for x in out["images"])
    assert n_images == 3
    for ids, imgs in zip(out["input_ids"], out["images"]):
        assert len(ids) == CUTOFF + 1
        runs_whole(llamafactory_qwen2vl, ids, len(imgs or []))


def test_patched_pairwise(llamafactory_qwen2vl, patched):
    rows = [([user(long_text(150, 1) + " <image>")], [assistant("good " * 10), assistant("bad " * 30)], llamafactory_qwen2vl.images[:1])]
    vanilla = llamafactory_qwen2vl.processor("PairwiseDatasetProcessor").preprocess_dataset(batch(rows))
    assert vanilla["chosen_input_ids"][0].count(llamafactory_qwen2vl.pad) < IMAGE_TOKENS
    patched()
    out = llamafactory_qwen2vl.processor("PairwiseDatasetProcessor").preprocess_dataset(batch(rows))
    for key in ("chosen", "rejected"):
        ids, labels = out[f"{key}_input_ids"][0], out[f"{key}_labels"][0]
        assert len(ids) <= CUTOFF and len(labels) == len(ids)
        runs_whole(llamafactory_qwen2vl, ids, 1)
        assert [t for t in labels if t != -100] == [t for t in vanilla[f"{key}_labels"][0] if t != -100]


def test_patched_feedback(llamafactory_qwen2vl, patched):
    rows = [
        ([user(long_text(150, 1) + " <image>")], [assistant("yes"), assistant("")], llamafactory_qwen2vl.images[:1]),
        ([user(long_text(140, 2) + " <image>")], [assistant(""), assistant("no")], llamafactory_qwen2vl.images[1:2]),
    ]
    patched()
    out = llamafactory_qwen2vl.processor("FeedbackDatasetProcessor").preprocess_dataset(batch(rows))
    assert out["kto_tags"] == [True, False]
    for k in range(2):
        for key in ("", "kl_"):
            ids, labels = out[f"{key}input_ids"][k], out[f"{key}labels"][k]
            assert len(ids) <= CUTOFF and len(labels) == len(ids)
            runs_whole(llamafactory_qwen2vl, ids, 1)


def test_patched_unsupervised(llamafactory_qwen2vl, patched):
    rows = [([user(long_text(150, 1) + " <image>")], [assistant("a red square")], llamafactory_qwen2vl.images[:1])]
    vanilla = llamafactory_qwen2vl.processor("UnsupervisedDatasetProcessor").preprocess_dataset(batch(rows))
    assert vanilla["input_ids"][0].count(llamafactory_qwen2vl.pad) < IMAGE_TOKENS
    patched()
    out = llamafactory_qwen2vl.processor("UnsupervisedDatasetProcessor").preprocess_dataset(batch(rows))
    assert len(out["input_ids"][0]) + len(out["labels"][0]) <= CUTOFF
    runs_whole(llamafactory_qwen2vl, out["input_ids"][0], 1)
    assert out["labels"][0] == vanilla["labels"][0]


SEQUENCES = {  # the token sequences each stage writes per sample
    "SupervisedDatasetProcessor": ["input_ids"],
    "PairwiseDatasetProcessor": ["chosen_input_ids", "rejected_input_ids"],
    "FeedbackDatasetProcessor": ["input_ids", "kl_input_ids"],
    "UnsupervisedDatasetProcessor": ["input_ids"],
}


@pytest.mark.parametrize("stage", list(SEQUENCES))
def test_a_cut_row_keeps_its_chat_frame_in_every_stage(llamafactory_qwen2vl, patched, stage):
    """An image after 150 words and a long answer, with a system prompt: the prompt's share of the budget
    is about what the image needs, so a cut that fills the rest of it from the start would lose the frame.
    vlpatch keeps the image run whole and every sequence it cuts still starts with the frame its uncut
    sequence starts with (system block and user header), as upstream's own cut keeps the head (docs/policies.md:
    what a cut row keeps)."""
    system = long_text(12, 11)
    answer = assistant(long_text(120, 5))
    responses = {"PairwiseDatasetProcessor": [answer, assistant(long_text(100, 6))],
                 "FeedbackDatasetProcessor": [answer, assistant("")]}.get(stage, [answer])
    rows = [([user(long_text(150, k) + " <image>")], responses, llamafactory_qwen2vl.images[k : k + 1]) for k in range(2)]
    data = {**batch(rows), "_system": [system, system]}
    uncut = llamafactory_qwen2vl.processor(stage, cutoff_len=4096).preprocess_dataset(data)
    header = len(llamafactory_qwen2vl.tok.encode(QWEN_SYSTEM_FRAME.format(system), add_special_tokens=False))
    patched()
    out = llamafactory_qwen2vl.processor(stage).preprocess_dataset(data)
    for key in SEQUENCES[stage]:
        for k in range(2):
            full, ids = uncut[key][k], out[key][k]
            frame = qwen_frame(llamafactory_qwen2vl.tok, full, system)
            assert frame >= header - 1, "the uncut sequence starts with the frame"
            assert len(ids) < len(full) and len(ids) <= CUTOFF, (key, k, len(ids), len(full))
            runs_whole(llamafactory_qwen2vl, ids, 1)
            assert ids[:frame] == full[:frame], f"{stage} {key}[{k}]: the cut sequence lost its chat frame"


def media_heavy_rows(llamafactory_qwen2vl):
    return [
        ([user("two pictures <image> and <image> then text")], [assistant("ok")], llamafactory_qwen2vl.images[:2]),
        ([user("short")], [assistant("fine")], []),
    ]


def test_policy_drop(llamafactory_qwen2vl, patched, tmp_path):
    patched(report=str(tmp_path / "r.jsonl"))
    out = llamafactory_qwen2vl.processor("SupervisedDatasetProcessor", cutoff_len=100).preprocess_dataset(batch(media_heavy_rows(llamafactory_qwen2vl)))
    assert len(out["input_ids"]) == 1 and not out["images"][0]
    (row,) = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert row["action"] == "dropped" and row["reason"].startswith("media_exceed_budget") and row["batch_position"] == 0


def test_policy_drop_media(llamafactory_qwen2vl, patched, tmp_path):
    patched(policy="drop_media", report=str(tmp_path / "r.jsonl"))
    examples = batch(media_heavy_rows(llamafactory_qwen2vl))
    out = llamafactory_qwen2vl.processor("SupervisedDatasetProcessor", cutoff_len=100).preprocess_dataset(examples)
    assert len(out["input_ids"]) == 2
    assert out["images"][0] == llamafactory_qwen2vl.images[:1], "the trailing image left the sample's list"
    runs_whole(llamafactory_qwen2vl, out["input_ids"][0], 1)
    assert len(out["input_ids"][0]) <= 100
    (row,) = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert row["action"] == "media_dropped" and row["media_removed"] == {"image": [1]}


def test_policy_error_names_the_sample(llamafactory_qwen2vl, patched):
    import vlpatch

    patched(policy="error")
    with pytest.raises(vlpatch.SampleError, match=r"sample \?\[batch position 0\]: media do not fit"):
        llamafactory_qwen2vl.processor("SupervisedDatasetProcessor", cutoff_len=100).preprocess_dataset(batch(media_heavy_rows(llamafactory_qwen2vl)))


def test_bad_input_is_a_reported_drop_or_a_named_error(llamafactory_qwen2vl, patched, tmp_path):
    import vlpatch

    rows = [
        ([user("two placeholders <image> <image>")], [assistant("x")], llamafactory_qwen2vl.images[:1]),
        ([user("<image> missing file")], [assistant("x")], [str(tmp_path / "nope.png")]),
        ([user("<image> good")], [assistant("x")], llamafactory_qwen2vl.images[:1]),
    ]
    patched(report=str(tmp_path / "r.jsonl"))
    out = llamafactory_qwen2vl.processor("SupervisedDatasetProcessor").preprocess_dataset(batch(rows))
    assert len(out["input_ids"]) == 1
    reported = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [(r["batch_position"], r["action"]) for r in reported] == [(0, "dropped"), (1, "dropped")]
    assert reported[0]["reason"] == "bad_input: 2 <image> placeholder(s) but 1 image(s)"
    assert reported[1]["reason"].startswith("bad_input") and "nope.png" in reported[1]["reason"]
    patched(policy="error")
    with pytest.raises(vlpatch.SampleError, match=r"batch position 0\]: bad_input"):
        llamafactory_qwen2vl.processor("SupervisedDatasetProcessor").preprocess_dataset(batch(rows))


def test_media_first_is_opt_in(llamafactory_qwen2vl, patched):
    rows = [([user(long_text(150, 1) + " <image>")], [assistant("a")], llamafactory_qwen2vl.images[:1])]
    patched(media_first=True)
    out = llamafactory_qwen2vl.processor("SupervisedDatasetProcessor").preprocess_dataset(batch(rows))
    ids = out["input_ids"][0]
    runs_whole(llamafactory_qwen2vl, ids, 1)
    before = llamafactory_qwen2vl.tok.decode(ids[: ids.index(llamafactory_qwen2vl.start)])
    assert before.endswith("<|im_start|>user\n"), f"the image stands at the start of the user turn: {before!r}"


def test_status_lists_every_plugin_as_covered(llamafactory_qwen2vl, patched):
    from llamafactory.data.mm_plugin import PLUGINS

    st = lf_status(patched().status())
    assert st["state"] == "applied"
    assert "qwen2_vl (image+video)" in st["covered_plugins"] and "mllama (image)" in st["covered_plugins"]
    assert len(st["covered_plugins"]) == len(PLUGINS) and not st["uncovered_plugins"]


def test_drifted_upstream_is_refused_and_left_untouched(llamafactory_qwen2vl, tmp_path, monkeypatch):
    """The real installed LLaMA-Factory against a matrix whose fingerprint of one target is different."""
    import vlpatch
    from llamafactory.data.processor import SupervisedDatasetProcessor
    from tests.fixtures import matrix_copy

    path = matrix_copy.with_fingerprint(tmp_path, "llamafactory.truncation", "SupervisedDatasetProcessor._encode_data_example", "0" * 16)
    monkeypatch.setenv("VLPATCH_MATRIX", path)
    original = vars(SupervisedDatasetProcessor)["_encode_data_example"]
    vlpatch.revert()
    try:
        # LLaMA-Factory is imported already: apply() itself stops, naming what differs
        with pytest.raises(vlpatch.UnknownUpstreamError, match="differs from tested .* in SupervisedDatasetProcessor._encode_data_example"):
            vlpatch.apply()
        st = lf_status(vlpatch.status())
        assert st["state"] == "refused" and "differs from that release's wheel" in st["reason"], st
        assert vars(SupervisedDatasetProcessor)["_encode_data_example"] is original
        assert type(vars(SupervisedDatasetProcessor)["preprocess_dataset"]).__name__ == "function", "nothing half-applied"
    finally:
        vlpatch.revert()
