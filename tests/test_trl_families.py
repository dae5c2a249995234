"""TRL's vision collators beyond Qwen2-VL: Gemma 3, Llama-3.2-Vision (Mllama), Pixtral, Qwen2.5-VL and
Qwen3-VL, each with its tiny real processor (tests/fixtures/tiny_processors.py, unsloth_families.py) and
a tiny random model of the family (tests/fixtures/tiny_vlm_models.py), on CPU.

- the real `SFTTrainer(...).train()` on messages and prompt/completion data: vanilla dies, patched trains
  2 optimizer steps with every batch's image runs whole and equal to the pixel tensors (newest TRL only,
  as the trainer runs cost most; the collator tests below run on every TRL session). Not Mllama's
  prompt/completion data (nor Gemma 3's before TRL 0.24.0): TRL's prompt/completion collator leaves
  Mllama's `cross_attention_mask` (and, before 0.24.0, `token_type_ids`) at the prompts' length, so the
  model fails on those batches with or without `max_length` (test_prompt_completion_upstream_limits);
- the real `DataCollatorForVisionLanguageModeling` on prompt/completion examples: vanilla cuts an image
  run, patched keeps every run whole, the batch through the family's model where upstream's fits it;
- the policies (drop, drop_media, error) on that collator (messages), each kept batch through the model;
- the real `DataCollatorForVisionPreference` (TRL 1.0 on) under each policy: pairs cut and decided
  together, chosen and rejected rows equal up to their completions, the batch through the model (not
  Mllama's, for its cross_attention_mask); the real `DPOTrainer(...).train()` with Gemma 3 (newest TRL).

The budget of each test is computed from the family's own unbounded batch: the cut lands inside the first
long example's image run (Mllama: on its one image token), so vanilla cuts it whatever the family's
sizes are.
"""

from __future__ import annotations

import contextlib
import copy

import pytest

from tests.conftest import newest_only
from tests.fixtures import batch_check
from tests.fixtures.tiny_models import image, long_text
from tests.fixtures.tiny_processors import CHAT_TEMPLATES
from tests.fixtures.trl_rows import VANILLA_ERRORS, report_rows

pytestmark = pytest.mark.trl

FAMILIES = ["gemma3", "mllama", "pixtral", "qwen2_5_vl", "qwen3_vl"]


class Fam:
    """A family's tiny real processor, its model builder and its media layout (`batch_check.layout`: the
    ids of its image tokens, named in tests/fixtures, not read from vlpatch)."""

    def __init__(self, name, processor):
        from tests.fixtures.tiny_vlm_models import MODELS

        self.name, self.processor, self.build = name, processor, MODELS[name]
        self.side = 224 if name.startswith("qwen") else 64  # Qwen2.5-VL: 64 image tokens, Qwen3-VL: 16 (128 px at most)
        self.layout = batch_check.layout(name, processor.tokenizer)

    def model(self):
        return self.build(self.processor)


@contextlib.contextmanager
def class_defaults_kept():
    """transformers 5.6's Qwen2VLImageProcessor / Qwen2VLVideoProcessor write `min_pixels` / `max_pixels`
    into the class's own `size` dict, so a later `Qwen2VLImageProcessor()` in the same process (the tiny
    Qwen2-VL's, tests/fixtures/tiny_models.py) would take this module's small sizes: put them back."""
    import transformers as T

    saved = []
    for name in ("Qwen2VLImageProcessor", "Qwen2VLImageProcessorFast", "Qwen2VLVideoProcessor", "Qwen3VLVideoProcessor"):
        try:
            cls = getattr(T, name)
        except (AttributeError, ImportError):
            continue
        if isinstance(vars(cls).get("size"), dict):
            saved.append((cls, copy.deepcopy(vars(cls)["size"])))
    try:
        yield
    finally:
        for cls, size in saved:
            cls.size = size


@pytest.fixture(scope="module", params=FAMILIES)
def tiny_family(request, trl, tmp_path_factory):
    """Each of FAMILIES as a `Fam`: its tiny real processor, its tiny model's builder, its media layout;
    skipped where this transformers cannot build the processor or the model."""
    from tests.fixtures import tiny_processors, unsloth_families

    name = request.param
    try:
        with class_defaults_kept():
            if name.startswith("qwen"):
                proc, _ = getattr(unsloth_families, name)(str(tmp_path_factory.mktemp("p")))
            else:
                built = getattr(tiny_processors, name)(str(tmp_path_factory.mktemp("p")))
                proc = built.proc if hasattr(built, "proc") else built[1]
                proc.chat_template = CHAT_TEMPLATES[name]
        f = Fam(name, proc)
        f.model()  # the model builds with this transformers
    except (ImportError, AttributeError, TypeError) as exc:
        pytest.skip(f"this transformers cannot build a tiny {name}: {exc!r}")
    return f


# --------------------------------------------------------------------------- examples


def user_content(f, words, seed, n_images=1):
    text = [{"type": "text", "text": long_text(words, seed)}]
    return text + [{"type": "image"}] * n_images


def messages_rows(f, n=4, words=60):
    """Even rows: `words` words of text before one image (over the budget); odd rows fit."""
    return [
        {
            "messages": [
                {"role": "user", "content": user_content(f, words if i % 2 == 0 else 3, i) + [{"type": "text", "text": "what is it"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "a red square"}]},
            ],
            "images": [image(f.side, i)],
        }
        for i in range(n)
    ]


def pc_rows(f, n=4, n_images=1, first_words=60):
    """Conversational prompt/completion: the image(s) close the prompt, long on even rows."""
    return [
        {
            "prompt": [{"role": "user", "content": user_content(f, first_words if i % 2 == 0 else 3, i, n_images if i == 0 else 1)}],
            "completion": [{"role": "assistant", "content": [{"type": "text", "text": "a red square " + long_text(8, 9)}]}],
            "images": [image(f.side, i + k) for k in range(n_images if i == 0 else 1)],
        }
        for i in range(n)
    ]


def preference_rows(f, n=4, n_images=1):
    rows = pc_rows(f, n, n_images)
    for r in rows:
        del r["completion"]
        r["chosen"] = [{"role": "assistant", "content": [{"type": "text", "text": "a red square " + long_text(6, 3)}]}]
        r["rejected"] = [{"role": "assistant", "content": [{"type": "text", "text": "a blue circle " + long_text(9, 4)}]}]
    return rows


ROWS = {"messages": messages_rows, "prompt_completion": pc_rows}

# --------------------------------------------------------------------------- checks


def runs(f, row):
    """The image runs of a row (`batch_check.Run`s); AssertionError naming a cut run."""
    return batch_check.runs(row, f.layout)


def check(f, batch, budget, prompt_only=()):
    """`batch_check.check`: input_ids at most `budget` wide; every image run whole and equal, in order, to
    its image in the pixel tensors; every per-token tensor as wide as input_ids (but `prompt_only`: keys
    upstream leaves at the prompt's length). Returns the runs per row."""
    per_token = [k for k in batch_check.PER_TOKEN if k not in prompt_only]
    return batch_check.check(batch, f.layout, batch_check.sizes(f.name, batch), width=budget, per_token=per_token)


def prompt_only_keys(trl) -> tuple:
    """The checked per-token tensors TRL's prompt/completion collator leaves at the prompts' length: the
    processor's token_type_ids before 0.24.0 (Mllama's cross_attention_mask, every release, is not checked)."""
    from packaging.version import Version

    return ("token_type_ids",) if trl.installed < Version("0.24.0") else ()


def upstream_breaks_the_model(trl, f) -> bool:
    """Prompt/completion batches the family's model cannot take even unbounded: Mllama (its
    cross_attention_mask), Gemma 3 before TRL 0.24.0 (its token_type_ids drive the image attention)."""
    from packaging.version import Version

    return f.name == "mllama" or (f.name == "gemma3" and trl.installed < Version("0.24.0"))


def forward(f, batch):
    """The batch through the family's tiny model, a backward pass: the model accepts what the collator made."""
    import torch

    model = f.model().train()
    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    if "labels" not in inputs:  # the preference collator leaves labels to the trainer
        inputs["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = model(**inputs)
    assert torch.isfinite(out.loss), out.loss
    out.loss.backward()


def cut_budget(f, collator_cls, rows, **kw):
    """A max_length inside example 0's first image run (its last tokens cut; Mllama's one token), from the
    unbounded vanilla batch (vlpatch reverted): room for the whole run beside the row's chat frame where
    text precedes the run, so that vlpatch keeps it whole."""
    full = collator_cls(f.processor, **kw)(rows)
    row = batch_check.rows(full)[0]
    run = runs(f, row)[0]
    length = run.stop - run.start
    budget = run.stop - max(1, min(2, length // 2))
    assert budget < len(row)
    return budget


def vanilla_cuts(f, collator, rows, budget, prompt_only=()):
    """Vanilla's outcome: an error from the processor, or a batch with a cut run (returned as text)."""
    try:
        batch = collator(rows)
        check(f, batch, budget, prompt_only)
    except (ValueError, AssertionError, IndexError, RuntimeError) as exc:
        assert isinstance(exc, AssertionError) or "image" in str(exc).lower(), repr(exc)
        return f"{type(exc).__name__}: {exc}"
    pytest.fail(f"vanilla {f.name}: max_length {budget} left every image run whole")


def sft_collator():
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    return DataCollatorForVisionLanguageModeling


# --------------------------------------------------------------------------- SFTTrainer


class Recording:
    """The trainer's own collator, each batch checked."""

    def __init__(self, inner, f, budget):
        self.inner, self.f, self.budget, self.batches = inner, f, budget, 0

    def __call__(self, examples):
        batch = self.inner(examples)
        check(self.f, batch, self.budget)
        if "cross_attention_mask" in batch:  # Mllama: one mask row per token
            assert batch["cross_attention_mask"].shape[:2] == batch["input_ids"].shape
        self.batches += 1
        return batch


def sft_trainer(trl, f, rows, budget, tmp_path):
    import datasets

    args = trl.SFTConfig(
        output_dir=str(tmp_path / "out"), max_length=budget, per_device_train_batch_size=2, max_steps=2,
        report_to="none", save_strategy="no", use_cpu=True, logging_steps=1, dataloader_num_workers=0, bf16=False,
    )
    return trl.SFTTrainer(model=f.model(), args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=f.processor)


@pytest.mark.parametrize("path", ["messages", "prompt_completion"])
def test_sft_trainer_vanilla_dies_and_patched_trains(trl, tiny_family, path, patched, tmp_path):
    import vlpatch

    newest_only("trl", "the trainer runs (the collator tests run on every TRL session)")
    if path == "prompt_completion" and upstream_breaks_the_model(trl, tiny_family):
        pytest.skip(f"TRL {trl.installed}'s prompt/completion collator leaves {tiny_family.name}'s per-token tensors at the "
                    "prompt's length: the model fails with or without max_length (test_prompt_completion_upstream_limits)")
    vlpatch.revert()
    budget = cut_budget(tiny_family, sft_collator(), ROWS[path](tiny_family))
    trainer = sft_trainer(trl, tiny_family, ROWS[path](tiny_family), budget, tmp_path)
    with pytest.raises(ValueError) as info:
        trainer.train()
    assert any(e in str(info.value) for e in VANILLA_ERRORS), repr(info.value)
    print(f"vanilla trl {trl.installed} {tiny_family.name} {path} (max_length {budget}): {type(info.value).__name__}: {info.value}")

    report = tmp_path / "report.jsonl"
    vp = patched(report=str(report))
    assert {r["id"]: r for r in vp.status()}["trl.sft_collator"]["state"] == "applied"
    trainer = sft_trainer(trl, tiny_family, ROWS[path](tiny_family), budget, tmp_path)
    trainer.data_collator = recording = Recording(trainer.data_collator, tiny_family, budget)
    trainer.train()
    assert trainer.state.global_step == 2 and recording.batches >= 2
    out = report_rows(report)
    assert out and {r["index"] for r in out} <= {0, 1} and all(r["trainer"] == "trl" for r in out), out
    assert all(r["action"] == "truncated" and r["tokens_after"] <= budget and r["media_tokens_after"] == r["media_tokens"] for r in out), out
    print(f"patched trl {trl.installed} {tiny_family.name} {path}: {len(out)} rows truncated, "
          f"media tokens kept {sorted({r['media_tokens_after'] for r in out})}, loss {trainer.state.log_history[-1].get('train_loss')}")


# --------------------------------------------------------------------------- the SFT collator, every TRL session


def test_prompt_completion_collator_keeps_runs_whole(trl, tiny_family, patched, tmp_path):
    import vlpatch

    vlpatch.revert()
    cls = sft_collator()
    budget = cut_budget(tiny_family, cls, pc_rows(tiny_family))
    prompt_only = prompt_only_keys(trl)
    print(f"vanilla trl {trl.installed} {tiny_family.name} prompt/completion (max_length {budget}): "
          + vanilla_cuts(tiny_family, cls(tiny_family.processor, max_length=budget), pc_rows(tiny_family), budget, prompt_only))

    report = tmp_path / "report.jsonl"
    patched(report=str(report))
    batch = cls(tiny_family.processor, max_length=budget)(pc_rows(tiny_family))
    check(tiny_family, batch, budget, prompt_only)
    assert batch["input_ids"].shape[0] == 4
    out = report_rows(report)
    assert {0, 2} <= {r["index"] for r in out}, out  # (Gemma 3's short rows too: its turn marks are plain text here)
    assert all(r["action"] == "truncated" and r["media_tokens_after"] == r["media_tokens"] for r in out), out
    if not upstream_breaks_the_model(trl, tiny_family):  # see test_prompt_completion_upstream_limits
        forward(tiny_family, batch)


def test_prompt_completion_upstream_limits(trl, tiny_family):
    """Why Mllama (and Gemma 3 before TRL 0.24.0) have no prompt/completion trainer test: TRL's collator
    concatenates prompt and completion input_ids but keeps the processor's cross_attention_mask (Mllama)
    or token_type_ids (before 0.24.0) of the prompts alone, so even an unbounded vanilla batch does not
    fit the model. When TRL fixes this, this test fails: add the family to the trainer test then."""
    import vlpatch

    if not upstream_breaks_the_model(trl, tiny_family):
        pytest.skip(f"TRL {trl.installed}'s prompt/completion batches of {tiny_family.name} fit its model")
    vlpatch.revert()
    batch = sft_collator()(tiny_family.processor)(pc_rows(tiny_family))
    key = "cross_attention_mask" if tiny_family.name == "mllama" else "token_type_ids"
    assert batch[key].shape[1] < batch["input_ids"].shape[1], {k: tuple(v.shape) for k, v in batch.items()}
    with pytest.raises((IndexError, RuntimeError)) as info:
        forward(tiny_family, batch)
    print(f"trl {trl.installed} {tiny_family.name} prompt/completion, no max_length, vlpatch reverted: {key} "
          f"{tuple(batch[key].shape)}, input_ids {tuple(batch['input_ids'].shape)}: {type(info.value).__name__}: {info.value}")


def big_example_rows(f, n):
    """Example 0: n images after three words; 1: three words before one image; 2: 20 words before one image."""
    rows = messages_rows(f, 3)
    rows[2] = messages_rows(f, 3, words=20)[2]
    rows[0]["images"] = [image(f.side, k) for k in range(n)]
    rows[0]["messages"][0]["content"] = user_content(f, 3, 0, n) + [{"type": "text", "text": "what is it"}]
    return rows


@pytest.mark.parametrize("policy", ["drop", "drop_media", "error"])
def test_policies_on_the_sft_collator(trl, tiny_family, policy, patched, tmp_path):
    """Example 0's images alone exceed max_length: dropped, its trailing images taken out (Mllama keeps
    images per row: dropped instead), or a SampleError naming it; the batch left goes through the model."""
    import vlpatch

    vlpatch.revert()
    cls = sft_collator()
    budget = cut_budget(tiny_family, cls, big_example_rows(tiny_family, 1)[2:])  # inside example 2's run
    run = runs(tiny_family, batch_check.rows(cls(tiny_family.processor)(big_example_rows(tiny_family, 1)[:1]))[0])[0]
    length = run.stop - run.start
    n = budget // length + 2  # example 0's images alone: more than the budget
    rows = big_example_rows(tiny_family, n)
    report = tmp_path / "report.jsonl"
    patched(policy=policy, report=str(report))
    collator = cls(tiny_family.processor, max_length=budget)
    if policy == "error":
        with pytest.raises(vlpatch.SampleError, match="batch example 0"):
            collator(rows)
        return
    batch = collator(rows)
    images = sum(map(len, check(tiny_family, batch, budget)))
    out = {r["index"]: r for r in report_rows(report)}
    assert {0, 2} <= set(out) <= {0, 1, 2}, out  # 1: a short example, but Gemma 3's turn marks are plain text here
    assert all(out[i]["action"] == "truncated" and out[i]["media_tokens_after"] == out[i]["media_tokens"] for i in set(out) - {0})
    if policy == "drop" or tiny_family.name == "mllama":
        assert out[0]["action"] == "dropped", out[0]
        assert batch["input_ids"].shape[0] == 2 and images == 2
    else:
        assert out[0]["action"] == "media_dropped", out[0]
        gone = out[0]["media_removed"]["image"]
        assert gone and gone == list(range(n - len(gone), n)), gone  # the trailing ones
        assert batch["input_ids"].shape[0] == 3 and images == n - len(gone) + 2
    forward(tiny_family, batch)


# --------------------------------------------------------------------------- DPO collator (TRL 1.0 on)


@pytest.mark.parametrize("policy", ["drop", "drop_media", "error"])
def test_dpo_collator_pairs(trl, tiny_family, policy, patched, tmp_path):
    """DataCollatorForVisionPreference: the long pair is cut with whole runs in both rows (vanilla cuts
    the run); example 0, whose images alone exceed max_length, is handled as one pair (Mllama keeps images
    per row: dropped under drop_media too). The kept batch goes through the model (not Mllama's: the
    collator leaves its cross_attention_mask at the prompts' length, as on the prompt/completion path)."""
    from packaging.version import Version

    import vlpatch

    if trl.installed < Version("1.0.0"):
        pytest.skip(f"trl {trl.installed}: DataCollatorForVisionPreference does not truncate before 1.0.0")
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference as cls

    vlpatch.revert()
    budget = cut_budget(tiny_family, cls, preference_rows(tiny_family))
    if policy == "drop":
        vanilla = vanilla_cuts(tiny_family, cls(tiny_family.processor, max_length=budget), preference_rows(tiny_family), budget)
        print(f"vanilla trl {trl.installed} {tiny_family.name} dpo (max_length {budget}): {vanilla}")
    run = runs(tiny_family, batch_check.rows(cls(tiny_family.processor)(preference_rows(tiny_family, 1)))[0])[0]
    length = run.stop - run.start
    n = budget // length + 2  # example 0: n images after three words, more than the budget

    report = tmp_path / "report.jsonl"
    patched(policy=policy, report=str(report))
    collator = cls(tiny_family.processor, max_length=budget)
    rows = preference_rows(tiny_family, 3, n_images=n)
    rows[0]["prompt"][0]["content"][0]["text"] = long_text(3, 0)
    if policy == "error":
        with pytest.raises(vlpatch.SampleError, match=r"batch example 0 \(chosen and rejected\)"):
            collator(rows)
        return
    batch = collator(rows)
    check(tiny_family, batch, budget)
    out = report_rows(report)
    zero = [r for r in out if r["index"] == 0]
    assert sorted(r["part"] for r in zero) == ["chosen", "rejected"], out
    two = [r for r in out if r["index"] == 2]
    assert two and all(r["action"] == "truncated" and r["media_tokens_after"] == r["media_tokens"] for r in two), out
    half = batch["input_ids"].shape[0] // 2
    per_row = [len(runs(tiny_family, row)) for row in batch_check.rows(batch)]
    assert per_row[:half] == per_row[half:], per_row  # chosen and rejected of a pair: the same images
    if policy == "drop" or tiny_family.name == "mllama":
        assert {r["action"] for r in zero} == {"dropped"} and half == 2
    else:
        assert {r["action"] for r in zero} == {"media_dropped"} and half == 3
        gone = zero[0]["media_removed"]["image"]
        assert zero[1]["media_removed"] == zero[0]["media_removed"] and gone == list(range(n - len(gone), n)), zero
    # the prompts of a pair are the same tokens up to the completion
    for i in range(half):
        a, b = batch_check.rows(batch)[i], batch_check.rows(batch)[i + half]
        last = max((run.stop for run in runs(tiny_family, a)), default=0)
        assert a[:last] == b[:last], i
    if tiny_family.name != "mllama":
        forward(tiny_family, batch)


def test_dpo_trainer_gemma3(trl, tiny_family, patched, tmp_path):
    """The real `DPOTrainer(...).train()` with a non-Qwen family (Gemma 3, newest TRL): vanilla dies on
    the cut run, patched trains 2 optimizer steps with every batch's runs whole."""
    import datasets

    import vlpatch

    newest_only("trl", "the trainer runs")
    if tiny_family.name != "gemma3":
        pytest.skip("Gemma 3 only (Qwen2-VL: tests/test_trl_collator.py)")
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    vlpatch.revert()
    budget = cut_budget(tiny_family, DataCollatorForVisionPreference, preference_rows(tiny_family))

    def trainer():
        args = trl.DPOConfig(
            output_dir=str(tmp_path / "out"), max_length=budget, per_device_train_batch_size=2, max_steps=2,
            report_to="none", save_strategy="no", use_cpu=True, logging_steps=1, dataloader_num_workers=0, bf16=False,
        )
        return trl.DPOTrainer(model=tiny_family.model(), ref_model=tiny_family.model(), args=args, processing_class=tiny_family.processor,
                              train_dataset=datasets.Dataset.from_list(preference_rows(tiny_family)))

    with pytest.raises(ValueError) as info:
        trainer().train()
    assert any(e in str(info.value) for e in VANILLA_ERRORS), repr(info.value)
    print(f"vanilla trl {trl.installed} {tiny_family.name} DPOTrainer (max_length {budget}): {type(info.value).__name__}: {info.value}")

    report = tmp_path / "report.jsonl"
    vp = patched(report=str(report))
    assert {r["id"]: r for r in vp.status()}["trl.dpo_collator"]["state"] == "applied"
    t = trainer()
    t.data_collator = recording = Recording(t.data_collator, tiny_family, budget)
    t.train()
    assert t.state.global_step == 2 and recording.batches >= 2
    out = report_rows(report)
    assert out and {r["part"] for r in out} == {"chosen", "rejected"}, out
    assert all(r["action"] == "truncated" and r["media_tokens_after"] == r["media_tokens"] == 18 for r in out), out
