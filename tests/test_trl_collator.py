"""TRL's real vision collators and trainers, vanilla and patched, on a tiny offline Qwen2-VL (real
processor, CPU): `SFTTrainer(...).train()` on the messages and the prompt/completion paths,
`DPOTrainer(...).train()` on a vision preference dataset (TRL 1.0 on), and the collators called directly
for the policies. Every batch the patched trainers see is checked: each image run whole and equal to
its `image_grid_thw` entry, rows within `max_length`. Gemma 3, Llama-3.2-Vision (Mllama) and Pixtral:
tiny real processors through the real `DataCollatorForVisionLanguageModeling`, collator only.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import newest_only
from tests.fixtures import batch_check
from tests.fixtures.chat_frame import QWEN_SYSTEM_FRAME, qwen_frame, unpadded
from tests.fixtures.tiny_models import image, long_text
from tests.fixtures.tiny_processors import CHAT_TEMPLATES
from tests.fixtures.trl_rows import BUDGET, VANILLA_ERRORS, messages_rows, report_rows, user

pytestmark = pytest.mark.trl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def processor(tiny_qwen2vl):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_qwen2vl)


def pc_rows(n=4):
    """Conversational prompt/completion: the image closes a long prompt (even rows)."""
    rows = []
    for i in range(n):
        rows.append({
            "prompt": [{"role": "user", "content": [{"type": "text", "text": long_text(60 if i % 2 == 0 else 5, i)},
                                                    {"type": "image"}]}],
            "completion": [{"role": "assistant", "content": [{"type": "text", "text": "a red square " + long_text(8, 9)}]}],
            "images": [image(224, i)],
        })
    return rows


def preference_rows(n=4, big=False):
    rows = []
    for i in range(n):
        side = 448 if big and i == 0 else 224
        rows.append({
            "prompt": [{"role": "user", "content": [{"type": "text", "text": long_text(60 if i % 2 == 0 else 5, i)},
                                                    {"type": "image"}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "a red square " + long_text(6, 3)}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "a blue circle " + long_text(9, 4)}]}],
            "images": [image(side, i)],
        })
    return rows


def check_batch(processor, batch, budget=BUDGET):
    """`batch_check.check` on a Qwen2-VL batch: input_ids at most `budget` wide; every image run whole, in
    order, equal to its image_grid_thw entry; per-token tensors as wide as input_ids."""
    batch_check.check(batch, batch_check.layout("qwen2_vl", processor.tokenizer), batch_check.sizes("qwen2_vl", batch), width=budget)


class Recording:
    """The trainer's own collator, each batch checked."""

    def __init__(self, inner, processor):
        self.inner, self.processor, self.batches = inner, processor, 0

    def __call__(self, examples):
        batch = self.inner(examples)
        check_batch(self.processor, batch)
        self.batches += 1
        return batch


def sft_trainer(trl, model_dir, processor, rows, tmp_path, **cfg):
    import datasets
    from transformers import Qwen2VLForConditionalGeneration

    args = trl.SFTConfig(
        output_dir=str(tmp_path / "out"), max_length=BUDGET, per_device_train_batch_size=2, max_steps=2,
        report_to="none", save_strategy="no", use_cpu=True, logging_steps=1, dataloader_num_workers=0, bf16=False,
        **cfg,
    )
    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir)
    return trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=processor)


@pytest.mark.parametrize("path", ["messages", "prompt_completion"])
def test_sft_vanilla_dies_and_patched_trains(trl, tiny_qwen2vl, processor, path, patched, tmp_path):
    import vlpatch

    rows = messages_rows if path == "messages" else pc_rows
    vlpatch.revert()
    trainer = sft_trainer(trl, tiny_qwen2vl, processor, rows(), tmp_path)
    with pytest.raises(ValueError) as info:
        trainer.train()
    assert any(e in str(info.value) for e in VANILLA_ERRORS), repr(info.value)
    print(f"vanilla trl {trl.installed} {path}: {type(info.value).__name__}: {info.value}")

    report = tmp_path / "report.jsonl"
    vp = patched(report=str(report))
    state = {r["id"]: r for r in vp.status()}["trl.sft_collator"]
    assert state["state"] == "applied", state
    trainer = sft_trainer(trl, tiny_qwen2vl, processor, rows(), tmp_path)
    trainer.data_collator = recording = Recording(trainer.data_collator, processor)
    trainer.train()
    assert trainer.state.global_step == 2 and recording.batches >= 2
    out = report_rows(report)
    assert out and all(r["trainer"] == "trl" and r["action"] == "truncated" for r in out), out
    assert all(r["tokens_after"] <= BUDGET and r["media_tokens_after"] == r["media_tokens"] == 66 for r in out), out
    assert all(isinstance(r["index"], int) for r in out)


def test_env_var_alone_makes_sft_train(trl, tiny_qwen2vl, tmp_path):
    """`VLPATCH=1` and no code change: the same script that dies without it trains."""
    newest_only("trl", "the start-up is vlpatch's own code, the same on every release; the patch attaching "
                "at this release's import is test_installed_upstream's, its collator under the trainer the tests above")
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        import datasets, trl
        from transformers import AutoProcessor, Qwen2VLForConditionalGeneration
        from tests.fixtures.trl_rows import messages_rows, BUDGET
        args = trl.SFTConfig(output_dir={str(tmp_path / 'out')!r}, max_length=BUDGET, per_device_train_batch_size=2,
                             max_steps=2, report_to="none", save_strategy="no", use_cpu=True, dataloader_num_workers=0,
                             bf16=False)
        trainer = trl.SFTTrainer(model=Qwen2VLForConditionalGeneration.from_pretrained({tiny_qwen2vl!r}), args=args,
                                 train_dataset=datasets.Dataset.from_list(messages_rows()),
                                 processing_class=AutoProcessor.from_pretrained({tiny_qwen2vl!r}))
        trainer.train()
        print("TRAINED", trainer.state.global_step)
    """))
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLPATCH")}
    env.update(VLPATCH="1", VLPATCH_REPORT=str(tmp_path / "report.jsonl"), HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert "TRAINED 2" in proc.stdout, proc.stderr[-3000:]
    out = report_rows(tmp_path / "report.jsonl")
    assert out and {r["action"] for r in out} == {"truncated"} and {r["trainer"] for r in out} == {"trl"}


def sft_collator(trl, processor):
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    return DataCollatorForVisionLanguageModeling(processor, max_length=BUDGET)


@pytest.mark.parametrize("policy", ["drop", "drop_media", "error"])
def test_sft_policies_name_each_sample(trl, processor, policy, patched, tmp_path):
    import vlpatch

    report = tmp_path / "report.jsonl"
    patched(policy=policy, report=str(report))
    collator = sft_collator(trl, processor)
    rows = messages_rows(3, big=True)  # 0: image alone over budget, 1: fits, 2: text cut
    if policy == "error":
        with pytest.raises(vlpatch.SampleError, match="batch example 0"):
            collator(rows)
        return
    batch = collator(rows)
    check_batch(processor, batch)
    out = {r["index"]: r for r in report_rows(report)}
    assert set(out) == {0, 2}, out
    assert out[2]["action"] == "truncated" and out[2]["media_tokens_after"] == 66
    if policy == "drop":
        assert out[0]["action"] == "dropped" and out[0]["reason"].startswith("media_exceed_budget")
        assert batch["input_ids"].shape[0] == 2 and batch["image_grid_thw"].shape[0] == 2
    else:
        assert out[0]["action"] == "media_dropped" and out[0]["media_removed"] == {"image": [0]}
        assert batch["input_ids"].shape[0] == 3 and batch["image_grid_thw"].shape[0] == 2


def test_sft_fitting_batch_is_upstreams_own(trl, processor, patched):
    """A batch within max_length comes out exactly as vanilla's."""
    import vlpatch

    rows = [messages_rows(2)[1], messages_rows(4)[3]]
    vlpatch.revert()
    vanilla = sft_collator(trl, processor)([dict(r) for r in rows])
    patched()
    ours = sft_collator(trl, processor)([dict(r) for r in rows])
    assert set(vanilla) == set(ours)
    for key in vanilla:
        assert (vanilla[key] == ours[key]).all(), key


def test_keep_end_stays_refused_for_vision(trl, tiny_qwen2vl, processor, patched, tmp_path):
    from packaging.version import Version

    if trl.installed < Version("1.0.0"):
        pytest.skip(f"trl {trl.installed} does not refuse truncation_mode='keep_end' for vision datasets")
    patched()
    with pytest.raises(ValueError, match="keep_end"):
        sft_trainer(trl, tiny_qwen2vl, processor, messages_rows(), tmp_path, truncation_mode="keep_end")


# --------------------------------------------------------------------------- DPO (TRL 1.0 on)


@pytest.fixture
def dpo(trl):
    from packaging.version import Version

    if trl.installed < Version("1.0.0"):
        pytest.skip(f"trl {trl.installed}: DataCollatorForVisionPreference does not truncate before 1.0.0")
    return trl


def dpo_trainer(trl, model_dir, processor, rows, tmp_path):
    import datasets
    from transformers import Qwen2VLForConditionalGeneration

    args = trl.DPOConfig(
        output_dir=str(tmp_path / "out"), max_length=BUDGET, per_device_train_batch_size=2, max_steps=2,
        report_to="none", save_strategy="no", use_cpu=True, logging_steps=1, dataloader_num_workers=0, bf16=False,
    )
    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir)
    ref = Qwen2VLForConditionalGeneration.from_pretrained(model_dir)
    return trl.DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=datasets.Dataset.from_list(rows),
                          processing_class=processor)


def test_dpo_vanilla_dies_and_patched_trains(dpo, tiny_qwen2vl, processor, patched, tmp_path):
    import vlpatch

    vlpatch.revert()
    trainer = dpo_trainer(dpo, tiny_qwen2vl, processor, preference_rows(), tmp_path)
    with pytest.raises(ValueError) as info:
        trainer.train()
    assert any(e in str(info.value) for e in VANILLA_ERRORS), repr(info.value)
    print(f"vanilla trl {dpo.installed} dpo: {type(info.value).__name__}: {info.value}")

    report = tmp_path / "report.jsonl"
    vp = patched(report=str(report))
    state = {r["id"]: r for r in vp.status()}["trl.dpo_collator"]
    assert state["state"] == "applied", state
    trainer = dpo_trainer(dpo, tiny_qwen2vl, processor, preference_rows(), tmp_path)
    trainer.data_collator = recording = Recording(trainer.data_collator, processor)
    trainer.train()
    assert trainer.state.global_step == 2 and recording.batches >= 2
    out = report_rows(report)
    assert out and all(r["trainer"] == "trl" and r["action"] == "truncated" for r in out), out
    assert {r["part"] for r in out} == {"chosen", "rejected"}
    assert all(r["media_tokens_after"] == 66 and r["tokens_after"] <= BUDGET for r in out)


@pytest.mark.parametrize("policy", ["drop", "drop_media", "error"])
def test_dpo_pair_is_handled_as_one(dpo, processor, policy, patched, tmp_path):
    import vlpatch
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    report = tmp_path / "report.jsonl"
    patched(policy=policy, report=str(report))
    collator = DataCollatorForVisionPreference(processor, max_length=BUDGET)
    rows = preference_rows(3, big=True)  # example 0: its image alone is over budget, in both rows
    if policy == "error":
        with pytest.raises(vlpatch.SampleError, match="batch example 0"):
            collator(rows)
        return
    batch = collator(rows)
    check_batch(processor, batch)
    out = report_rows(report)
    zero = [r for r in out if r["index"] == 0]
    assert sorted(r["part"] for r in zero) == ["chosen", "rejected"], out
    if policy == "drop":
        assert {r["action"] for r in zero} == {"dropped"}
        assert batch["input_ids"].shape[0] == 4 and batch["image_grid_thw"].shape[0] == 4  # two pairs left
    else:
        assert {r["action"] for r in zero} == {"media_dropped"} and all(r["media_removed"] == {"image": [0]} for r in zero)
        assert batch["input_ids"].shape[0] == 6 and batch["image_grid_thw"].shape[0] == 4
    # chosen rows first, then rejected, pair by pair: the same prompt image in both rows of a pair
    half = batch["input_ids"].shape[0] // 2
    grids = batch["image_grid_thw"].tolist()
    assert grids[: len(grids) // 2] == grids[len(grids) // 2 :] and half * 2 == batch["input_ids"].shape[0]


def test_sft_a_later_turns_image_leaves_with_the_cut(trl, processor, patched, tmp_path):
    """Two turns with a 66-token image each, max_length 96: the second turn's image leaves with the part
    the cut removes (kept, truncated, reported), the first turn's stays."""
    report = tmp_path / "report.jsonl"
    patched(report=str(report))
    turns = []
    for k in range(2):
        turns += [{"role": "user", "content": [{"type": "text", "text": long_text(5, k)}, {"type": "image"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "a red square"}]}]
    rows = [{"messages": turns, "images": [image(224, 1), image(224, 2)]}, messages_rows(2)[1]]
    batch = sft_collator(trl, processor)(rows)
    check_batch(processor, batch)
    assert batch["input_ids"].shape[0] == 2 and batch["image_grid_thw"].shape[0] == 2
    (row,) = report_rows(report)
    assert (row["index"], row["action"], row["media_removed"]) == (0, "truncated", {"image": [1]}), row
    assert row["reason"].startswith("media_left_with_turn: image#1"), row


def framed_row(system: str, words: int = 60, seed: int = 3) -> dict:
    return {"messages": [{"role": "system", "content": [{"type": "text", "text": system}]},
                         {"role": "user", "content": user(words, seed)},
                         {"role": "assistant", "content": [{"type": "text", "text": "a red square"}]}],
            "images": [image(224, seed)]}


def frame_length(processor, row_ids, system: str) -> int:
    """The chat frame an uncut row starts with (system block, user header), as the template writes it."""
    n = qwen_frame(processor.tokenizer, row_ids, system)
    assert n >= len(processor.tokenizer.encode(QWEN_SYSTEM_FRAME.format(system), add_special_tokens=False)) - 1, "the frame is the row's start"
    return n


@pytest.mark.parametrize("policy", ["drop", "drop_media"])
def test_sft_cut_row_keeps_its_chat_frame(trl, processor, policy, patched, tmp_path):
    """A row whose image takes nearly all of max_length keeps its system block and user header beside the
    image (the text after the frame gives way); where frame and image cannot fit together the policy
    decides: `drop` drops the row, `drop_media` takes the image out and the row keeps its frame."""
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    system = long_text(10, 7)
    full = DataCollatorForVisionLanguageModeling(processor)([framed_row(system)])
    uncut = unpadded(full, 0)
    frame = frame_length(processor, uncut, system)
    report = tmp_path / "report.jsonl"
    patched(policy=policy, report=str(report))
    for budget, fits in ((66 + frame + 4, True), (66 + frame - 4, False)):
        rows = [framed_row(system), messages_rows(2)[1]]
        batch = DataCollatorForVisionLanguageModeling(processor, max_length=budget)(rows)
        check_batch(processor, batch, budget=budget)
        row = report_rows(report)[-1]
        assert row["index"] == 0, row
        if fits:
            assert row["action"] == "truncated" and row["media_tokens_after"] == 66, row
            assert unpadded(batch, 0)[:frame] == uncut[:frame], "the cut row starts with its frame"
        elif policy == "drop":
            assert row["action"] == "dropped" and "beside its chat frame of" in row["reason"], row
            assert batch["input_ids"].shape[0] == 1
        else:
            assert row["action"] == "media_dropped" and row["media_removed"] == {"image": [0]}, row
            assert unpadded(batch, 0)[:frame] == uncut[:frame], "the cut row starts with its frame"


def framed_pair(system: str, words: int = 60, seed: int = 3) -> dict:
    return {"prompt": [{"role": "system", "content": [{"type": "text", "text": system}]},
                       {"role": "user", "content": [{"type": "text", "text": long_text(words, seed)}, {"type": "image"}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "a red square"}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "a blue circle"}]}],
            "images": [image(224, seed)]}


@pytest.mark.parametrize("policy", ["drop", "drop_media"])
def test_dpo_cut_pair_keeps_its_chat_frame(dpo, processor, policy, patched, tmp_path):
    """A preference pair whose image takes nearly all of max_length: both rows keep the prompt's system
    block and user header beside the image; where frame and image cannot fit together the policy decides
    for the pair (`drop`: both rows go; `drop_media`: the image leaves both, each row keeps its frame)."""
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    system = long_text(10, 7)
    full = DataCollatorForVisionPreference(processor)([framed_pair(system)])
    uncut = [unpadded(full, 0), unpadded(full, 1)]
    frame = frame_length(processor, uncut[0], system)
    assert uncut[1][:frame] == uncut[0][:frame]
    report = tmp_path / "report.jsonl"
    patched(policy=policy, report=str(report))
    for budget, fits in ((66 + frame + 4, True), (66 + frame - 4, False)):
        rows = [framed_pair(system), preference_rows(2)[1]]
        batch = DataCollatorForVisionPreference(processor, max_length=budget)(rows)
        check_batch(processor, batch, budget=budget)
        mine = [r for r in report_rows(report) if r["index"] == 0][-2:]
        assert sorted(r["part"] for r in mine) == ["chosen", "rejected"], mine
        half = batch["input_ids"].shape[0] // 2
        if fits:
            assert {r["action"] for r in mine} == {"truncated"} and all(r["media_tokens_after"] == 66 for r in mine), mine
            for i, u in ((0, uncut[0]), (half, uncut[1])):
                assert unpadded(batch, i)[:frame] == u[:frame], "each cut row starts with the prompt's frame"
        elif policy == "drop":
            assert {r["action"] for r in mine} == {"dropped"} and all("beside its chat frame of" in r["reason"] for r in mine), mine
            assert batch["input_ids"].shape[0] == 2
        else:
            assert {r["action"] for r in mine} == {"media_dropped"} and all(r["media_removed"] == {"image": [0]} for r in mine), mine
            for i, u in ((0, uncut[0]), (half, uncut[1])):
                assert unpadded(batch, i)[:frame] == u[:frame], "each cut row starts with the prompt's frame"


# --------------------------------------------------------------------------- policy shrink


def test_sft_shrink_downsizes_the_image_until_the_example_fits(trl, tiny_qwen2vl, processor, patched, tmp_path):
    """Row 0's 448 px image alone is 258 tokens, over max_length 96: under shrink it is collated again
    with the image downsized until the example fits; the batch's pixel tensors are the processor's own
    for it; the caller's rows are untouched; then the real SFTTrainer trains on such rows."""
    report = tmp_path / "report.jsonl"
    patched(policy="shrink", shrink_min_pixels=28 * 28, report=str(report))
    collator = sft_collator(trl, processor)
    rows = messages_rows(3, big=True)
    batch = collator(rows)
    assert rows[0]["images"][0].size == (448, 448), "the caller's example is untouched"
    check_batch(processor, batch)
    assert batch["input_ids"].shape[0] == 3 and batch["image_grid_thw"].shape[0] == 3, "nothing dropped"
    out = {r["index"]: r for r in report_rows(report)}
    assert out[0]["action"] == "shrunk" and out[0]["reason"].startswith("media_shrunk: "), out[0]
    (item,) = out[0]["media_resized"]
    assert item["before"] == [448, 448] and item["tokens_after"] < item["tokens_before"] == 258, item
    assert out[2]["action"] == "truncated"
    trainer = sft_trainer(trl, tiny_qwen2vl, processor, messages_rows(4, big=True), tmp_path)
    trainer.data_collator = recording = Recording(trainer.data_collator, processor)
    trainer.train()
    assert trainer.state.global_step == 2 and recording.batches >= 2


def test_dpo_shrink_keeps_the_pair(dpo, processor, patched, tmp_path):
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    report = tmp_path / "report.jsonl"
    patched(policy="shrink", shrink_min_pixels=28 * 28, report=str(report))
    batch = DataCollatorForVisionPreference(processor, max_length=BUDGET)(preference_rows(3, big=True))
    check_batch(processor, batch)
    assert batch["input_ids"].shape[0] == 6, "the pair is kept"
    zero = [r for r in report_rows(report) if r["index"] == 0]
    assert sorted(r["part"] for r in zero) == ["chosen", "rejected"] and {r["action"] for r in zero} == {"shrunk"}, zero
    grids = batch["image_grid_thw"].tolist()
    assert grids[:3] == grids[3:], "both rows of a pair hold the same downsized image"


# --------------------------------------------------------------------------- other families, collator only
# Gemma 3, Llama-3.2-Vision (Mllama) and Pixtral: tiny real processors (tests/fixtures/tiny_processors.py),
# TRL's real DataCollatorForVisionLanguageModeling called directly on messages examples with images.

@pytest.fixture(scope="module", params=["gemma3", "mllama", "pixtral"])
def tiny_family(request, trl, tmp_path_factory):
    """Gemma 3, Mllama or Pixtral: the family's tiny real processor with a chat template, and its media
    layout (`batch_check.layout`: the ids of its image tokens, named in tests/fixtures, not read from vlpatch)."""
    from tests.fixtures import tiny_processors

    try:
        built = getattr(tiny_processors, request.param)(str(tmp_path_factory.mktemp("p")))
    except (ImportError, AttributeError, TypeError) as exc:
        pytest.skip(f"this transformers cannot build a {request.param} processor: {exc!r}")
    proc = built.proc if hasattr(built, "proc") else built[1]
    proc.chat_template = CHAT_TEMPLATES[request.param]

    class Fam:
        pass

    f = Fam()
    f.name, f.processor = request.param, proc
    f.layout = batch_check.layout(f.name, proc.tokenizer)
    return f


def family_rows(n=4):
    """Even rows: ~60 words of text before one image (over the budget); odd rows fit."""
    return [
        {
            "messages": [
                {"role": "user", "content": user(60 if i % 2 == 0 else 3, i)},
                {"role": "assistant", "content": [{"type": "text", "text": "a red square"}]},
            ],
            "images": [image(64, i)],
        }
        for i in range(n)
    ]


def check_family_batch(f, batch, budget):
    """`batch_check.check`: input_ids at most `budget` wide, every image run whole and as long as its image
    in the pixel tensors (Mllama: as many runs per row as its filled pixel slots)."""
    batch_check.check(batch, f.layout, batch_check.sizes(f.name, batch), width=budget)


def test_family_vanilla_cuts_the_run_and_patched_keeps_it_whole(trl, tiny_family, patched, tmp_path):
    import vlpatch
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    vlpatch.revert()
    full = DataCollatorForVisionLanguageModeling(tiny_family.processor)(family_rows())  # no max_length: nothing cut
    row = full["input_ids"][0][full["attention_mask"][0].bool()].tolist()
    (run,) = batch_check.runs(row, tiny_family.layout)
    first, length = run.start, run.stop - run.start
    budget = first + max(length // 2, 0)  # the cut lands inside row 0's image run (Mllama: on its one token)
    assert budget < len(row)

    try:
        vanilla = DataCollatorForVisionLanguageModeling(tiny_family.processor, max_length=budget)(family_rows())
        check_family_batch(tiny_family, vanilla, budget)
    except (ValueError, AssertionError, IndexError, RuntimeError) as exc:
        assert isinstance(exc, AssertionError) or "image" in str(exc).lower(), repr(exc)
        print(f"vanilla trl {trl.installed} {tiny_family.name} (max_length {budget}, row 0 {len(row)} tokens, image run at "
              f"{first}..{first + length}): {type(exc).__name__}: {exc}")
    else:
        pytest.fail(f"vanilla {tiny_family.name}: max_length {budget} left every image run whole")

    report = tmp_path / "report.jsonl"
    vp = patched(report=str(report))
    state = {r["id"]: r for r in vp.status()}["trl.sft_collator"]
    assert state["state"] == "applied", state
    batch = DataCollatorForVisionLanguageModeling(tiny_family.processor, max_length=budget)(family_rows())
    check_family_batch(tiny_family, batch, budget)
    assert batch["input_ids"].shape[0] == 4
    out = report_rows(report)
    assert out and {r["index"] for r in out} == {0, 2}, out
    assert all(r["trainer"] == "trl" and r["action"] == "truncated" for r in out), out
    assert all(r["tokens_after"] <= budget and r["media_tokens_after"] == r["media_tokens"] for r in out), out
    print(f"patched trl {trl.installed} {tiny_family.name}: {len(out)} report rows: "
          + "; ".join(f"#{r['index']} {r['action']} tokens_after={r['tokens_after']} media={r['media_tokens_after']}" for r in out))


def test_each_trl_patch_keeps_its_own_matrix_options():
    """The SFT and the DPO patch each attach with their own options, on their own CollatorPatch, and
    `filter_dataset` takes the CollatorPatch of the patch that wraps the collator's class. (Both patches once
    attached to one shared CollatorPatch: the second replaced the first's options, unnoticed while the matrix tied
    the two option tables together.) Upstream-free: runs wherever the TRL files do."""
    import dataclasses

    from vlpatch import matrix as vmatrix
    from vlpatch.integrations import trl as vtrl

    specs = {p.id: p for p in vmatrix.load(vmatrix.MATRIX_PATH).patches if p.distribution == "trl"}
    sft = dataclasses.replace(specs["trl.sft_collator"], options={"media_tokens": {"Qwen2VLProcessor": {}}})
    dpo = dataclasses.replace(specs["trl.dpo_collator"], options={"media_tokens": {}})
    saved = dict(vtrl.SITES)
    try:
        vtrl.SITES.clear()
        by_sft, by_dpo = vtrl.wrappers(sft), vtrl.wrappers(dpo)
        sft_site, dpo_site = vtrl.SITES["trl.sft_collator"], vtrl.SITES["trl.dpo_collator"]
        assert sft_site is not dpo_site
        assert sft_site.options is sft.options and dpo_site.options is dpo.options
        assert by_sft["collate_sft"].args == (sft_site,) and by_dpo["collate_dpo"].args == (dpo_site,)

        class DataCollatorForVisionPreference:  # the DPO patch's class, by name, as a user's subclass has it
            pass

        class Mine(DataCollatorForVisionPreference):
            pass

        class DataCollatorForVisionLanguageModeling:
            pass

        assert vtrl._site_of(Mine()) is dpo_site and vtrl._site_of(DataCollatorForVisionLanguageModeling()) is sft_site
    finally:
        vtrl.SITES.clear()
        vtrl.SITES.update(saved)
