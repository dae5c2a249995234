#!/usr/bin/env python3
"""GPU check, one stage: the real `unsloth` (FastVisionModel + LoRA + TRL's SFTTrainer + UnslothVisionDataCollator)
on the tiny offline Qwen2-VL of a plan that tests/test_gpu_unsloth.py builds (tests/fixtures/gpu_unsloth.py),
vanilla or with vlpatch. The test runs each stage in its own process through this script:

    python -m pytest -m gpu tests/test_gpu_unsloth.py        # or scripts/gpu_unsloth_check.sh on a device
    OUT=/some/dir python3 scripts/gpu_unsloth_check.py --stage patched --plan /path/plan.json   # one by hand

Stages (the environment each gets is the test's: VLPATCH_REPORT, VLPATCH_POLICY, ...):
  vanilla  upstream unsloth, no vlpatch: the collator alone, then SFTTrainer (the upstream error is expected)
  patched  `import vlpatch; vlpatch.apply()` before `import unsloth`: the same, training must finish
  shrink   the same with VLPATCH_POLICY=shrink: the image too large for max_seq_length is downsized, not dropped
  qlora    as shrink, with the model loaded in 4 bits (QLoRA: load_in_4bit=True, bitsandbytes), the way unsloth's
           notebooks load it
  video    VLPATCH_POLICY=shrink on conversations with a 16-frame video (frames in the message part): each keeps
           fewer frames until it fits; video tokens per row checked against video_grid_thw
Every batch the collator returns is checked (tests/fixtures/batch_check.py): media tokens per row against the
grid, runs whole, rows within max_seq_length. Writes $OUT/result_<stage>.json; exit status 0 when training
finished, 1 when it did not, 2 on an error outside the stage. No model hub: HF_HUB_OFFLINE=1. Without a GPU,
UNSLOTH_ALLOW_CPU=1 makes it a CPU dry run (unsloth's GPU code path on CPU; may fail where it needs CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from tests.fixtures.gpu_unsloth import DIRECT_PAIRS, OFFLINE, VIDEO_PAIRS, image_runs, log, make_example, print_versions  # noqa: E402

OUT = os.environ.get("OUT") or os.path.join(REPO, "out", "gpu_unsloth_check")
STEPS = int(os.environ.get("GPU_CHECK_STEPS", "4"))
STAGES = ["vanilla", "patched", "shrink", "qlora", "video"]


def stage_train(mode, plan_path):
    """Run one stage; its result (also written to $OUT/result_<mode>.json as it goes): ok (training finished),
    errors, collator_errors, batches (each checked), losses, status (vlpatch's unsloth rows), fast_vision_model,
    fast_vision_peft, fallback_model, four_bit_modules (qlora)."""
    result = {"mode": mode, "ok": False, "errors": [], "batches": [], "losses": []}
    t0 = time.time()
    step = lambda name: log(f"--- [{mode}] {name} (t+{time.time() - t0:.1f}s)")  # noqa: E731
    res_path = os.path.join(OUT, f"result_{mode}.json")

    def save():
        with open(res_path, "w") as fh:
            json.dump(result, fh, indent=1, default=str)

    def fail(where, exc):
        tb = traceback.format_exc()
        log(f"!!! [{mode}] {where} failed: {type(exc).__name__}: {exc}")
        log(tb)
        result["errors"].append({"where": where, "type": type(exc).__name__, "message": str(exc)[:2000],
                                 "traceback": tb[-6000:]})
        save()

    with open(plan_path) as fh:
        plan = json.load(fh)
    max_len, image_id = plan["max_len"], plan["image_token_id"]
    grid_key, rows_key = "image_grid_thw", "dataset"
    if mode == "video":  # the same checks on the video tokens
        image_id, grid_key, rows_key = plan["video_token_id"], "video_grid_thw", "video_dataset"

    if mode != "vanilla":
        step(f"import vlpatch; vlpatch.apply() (VLPATCH_POLICY={os.environ.get('VLPATCH_POLICY', 'drop (default)')})")
        import vlpatch

        vlpatch.apply()
        log(f"vlpatch {vlpatch.__version__} from {os.path.dirname(vlpatch.__file__)}; VLPATCH_REPORT={os.environ.get('VLPATCH_REPORT')}")
    step("import unsloth")
    try:
        import unsloth  # noqa: F401
        from unsloth import FastVisionModel
        from unsloth.trainer import UnslothVisionDataCollator
    except Exception as exc:
        fail("import unsloth", exc)
        return result
    import torch

    log(f"unsloth {getattr(unsloth, '__version__', '?')} from {os.path.dirname(unsloth.__file__)}; "
        f"CPU backend: {getattr(unsloth, '_IS_CPU_BACKEND', None)}; collator {UnslothVisionDataCollator.__module__}."
        f"{UnslothVisionDataCollator.__qualname__} mro {[c.__module__ + '.' + c.__name__ for c in UnslothVisionDataCollator.__mro__]}")
    print_versions(prefix=f"[{mode}] ")
    if torch.cuda.is_available():
        log(f"GPU: {torch.cuda.get_device_name(0)}, capability {torch.cuda.get_device_capability(0)}, torch cuda {torch.version.cuda}")
    import sys as _sys

    log("loaded optional packages: " + str(sorted({m.split('.')[0] for m in _sys.modules} & {
        "bitsandbytes", "xformers", "torchao", "diffusers", "cut_cross_entropy", "torchvision", "flash_attn", "vlpatch"})))
    if mode != "vanilla":
        import vlpatch

        rows = [r for r in vlpatch.status() if r["id"].startswith("unsloth")]
        result["status"] = rows
        for r in rows:
            log(f"vlpatch.status: {json.dumps(r)}")

    four_bit = mode == "qlora"
    step(f"FastVisionModel.from_pretrained (tiny local Qwen2-VL, {'4-bit QLoRA' if four_bit else '16-bit LoRA'})")
    model = processor = None
    try:
        model, processor = FastVisionModel.from_pretrained(
            plan["model_dir"], max_seq_length=max_len, dtype=None, load_in_4bit=four_bit, load_in_8bit=False,
            full_finetuning=False, use_gradient_checkpointing="unsloth",
        )
        log(f"model {type(model).__name__} dtype {getattr(model, 'dtype', '?')} device {getattr(model, 'device', '?')}; "
            f"processor {type(processor).__name__}")
        if four_bit:
            kinds = sorted({type(m).__name__ for m in model.modules()
                            if "4bit" in type(m).__name__ or type(getattr(m, "weight", None)).__name__ == "Params4bit"})
            result["four_bit_modules"] = kinds
            log(f"4-bit modules: {kinds or 'NONE (the model was not quantized)'}")
        result["fast_vision_model"] = True
    except Exception as exc:
        fail("FastVisionModel.from_pretrained", exc)
    if model is not None:
        step("FastVisionModel.get_peft_model (LoRA r=8, vision + language layers)")
        try:
            model = FastVisionModel.get_peft_model(
                model, r=8, lora_alpha=8, lora_dropout=0, bias="none", finetune_vision_layers=True,
                finetune_language_layers=True, finetune_attention_modules=True, finetune_mlp_modules=True,
                random_state=3407, use_gradient_checkpointing="unsloth",
            )
            FastVisionModel.for_training(model)
            result["fast_vision_peft"] = True
        except Exception as exc:
            fail("FastVisionModel.get_peft_model", exc)
            model = None
    if model is None:
        # so that the collator and the trainer still run: the plain transformers model with peft's LoRA
        step("FALLBACK (unsloth's loader failed, see above): transformers Qwen2VLForConditionalGeneration + peft LoRA")
        result["fallback_model"] = True
        try:
            from peft import LoraConfig, get_peft_model
            from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

            cuda = torch.cuda.is_available()
            model = Qwen2VLForConditionalGeneration.from_pretrained(
                plan["model_dir"], dtype=torch.bfloat16 if cuda else torch.float32)
            model = model.to("cuda" if cuda else "cpu")
            processor = AutoProcessor.from_pretrained(plan["model_dir"])
            model = get_peft_model(model, LoraConfig(
                r=8, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        except Exception as exc:
            fail("fallback model", exc)
            return result
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"model {type(model).__name__}, trainable parameters {trainable}, processor {type(processor).__name__}")

    Base = UnslothVisionDataCollator
    counter = {"n": 0}

    def check(batch, examples, where):
        """tests/fixtures/batch_check.py's check (image and video runs whole, each as long as its grid entry,
        the pixel tensors holding the grids' patches, rows within max_len, labels aligned); runs per row logged."""
        from tests.fixtures import batch_check

        info = {"where": where, "batch": counter["n"], "examples": len(examples),
                "images_in": [len(e.get("images") or []) for e in examples]}
        ids = batch["input_ids"]
        grid = batch.get(grid_key)
        grid_tokens = [int(x) for x in (grid.prod(dim=-1) // 4).tolist()] if grid is not None else []
        rows = batch_check.rows(batch)
        runs_all = [[length for _, length in image_runs(row, image_id)] for row in rows]
        rows = [len(row) for row in rows]
        flat = [r for runs in runs_all for r in runs]
        problems = []
        try:
            layout = batch_check.layout("qwen2_vl", getattr(processor, "tokenizer", processor))
            batch_check.check(batch, layout, batch_check.sizes("qwen2_vl", batch), budget=max_len)
        except AssertionError as exc:
            problems.append(str(exc))
        info.update(rows=ids.shape[0], shape=tuple(ids.shape), row_tokens=rows, image_runs=runs_all,
                    image_tokens=sum(flat), grid_tokens=grid_tokens, grid_sum=sum(grid_tokens),
                    ok=not problems, problems=problems)
        result["batches"].append(info)
        log(f"[{mode}] {where} batch {counter['n']}: {len(examples)} example(s) with images {info['images_in']} -> "
            f"input_ids {tuple(ids.shape)}, row tokens {rows}, image runs per row {runs_all}, "
            f"{'video' if mode == 'video' else 'image'} tokens {sum(flat)} vs {grid_key} {grid_tokens} (sum {sum(grid_tokens)}): "
            + ("OK" if not problems else "MISMATCH " + "; ".join(problems)))
        save()

    class Checked(Base):
        def __call__(self, examples):
            counter["n"] += 1
            try:
                batch = super().__call__(examples)
            except Exception as exc:
                log(f"[{mode}] batch {counter['n']}: the collator raised {type(exc).__name__}: {str(exc)[:600]}")
                result.setdefault("collator_errors", []).append(f"{type(exc).__name__}: {str(exc)[:600]}")
                save()
                raise
            try:
                check(batch, examples, self._where)
            except Exception as exc:  # the check itself must never stop training
                log(f"[{mode}] batch check failed: {exc!r}")
            return batch

    Checked.__name__ = Base.__name__
    Checked.__qualname__ = Base.__qualname__
    Checked._where = "trainer"

    dataset = [make_example(d["spec"]) for d in plan[rows_key]]
    names = [d["name"] for d in plan[rows_key]]
    log(f"dataset ({len(dataset)}): {names}; max_seq_length {max_len}")

    step("the collator alone: [long_2img_cut, short_2img], [long_1img_cut, short_1img], [big_image_alone_too_long, short_1img]")
    try:
        collator = Checked(model, processor, max_seq_length=max_len, resize="max")
        collator._where = "direct"
        for pair in DIRECT_PAIRS if mode != "video" else VIDEO_PAIRS:
            exs = [dataset[names.index(n)] for n in pair]
            try:
                collator(exs)
            except Exception as exc:
                fail(f"collator on {list(pair)}", exc)
        collator._where = "trainer"
    except Exception as exc:
        fail("UnslothVisionDataCollator(...)", exc)
        return result

    step(f"SFTTrainer: {STEPS} steps, batch 2")
    try:
        from trl import SFTConfig, SFTTrainer
        try:
            from unsloth import is_bfloat16_supported
        except ImportError:
            is_bfloat16_supported = torch.cuda.is_bf16_supported
        bf16 = bool(torch.cuda.is_available() and is_bfloat16_supported())
        args = SFTConfig(
            output_dir=os.path.join(os.path.dirname(os.path.abspath(plan_path)), f"trainer_{mode}"), per_device_train_batch_size=2,
            gradient_accumulation_steps=1, warmup_steps=0, max_steps=STEPS, learning_rate=2e-4,
            logging_steps=1, optim="adamw_torch", weight_decay=0.0, lr_scheduler_type="linear", seed=3407,
            report_to="none", save_strategy="no", remove_unused_columns=False, dataset_text_field="",
            dataset_kwargs={"skip_prepare_dataset": True}, max_length=max_len, dataloader_num_workers=0,
            bf16=bf16, fp16=bool(torch.cuda.is_available() and not bf16),
        )
        try:
            from datasets import Dataset

            train = Dataset.from_list([make_example(d["spec"]) for d in plan[rows_key]])
            log(f"train_dataset: datasets.Dataset {train.features}")
        except Exception as exc:
            fail("datasets.Dataset.from_list", exc)
            train = dataset
        try:
            trainer = SFTTrainer(model=model, processing_class=processor, data_collator=collator,
                                 train_dataset=train, args=args)
        except TypeError as exc:
            if "processing_class" not in str(exc):
                raise
            log(f"SFTTrainer(processing_class=...) refused ({exc}); retrying with tokenizer=")
            trainer = SFTTrainer(model=model, tokenizer=processor, data_collator=collator,
                                 train_dataset=train, args=args)
        log(f"trainer {type(trainer).__name__} ({type(trainer).__module__}), collator {type(trainer.data_collator).__name__}")
    except Exception as exc:
        fail("SFTTrainer(...)", exc)
        return result
    step("trainer.train()")
    try:
        out = trainer.train()
        log(f"[{mode}] train() finished: {out}")
        result["ok"] = True
    except Exception as exc:
        fail("trainer.train()", exc)
    finally:
        hist = getattr(trainer.state, "log_history", [])
        result["losses"] = [(h.get("step"), h.get("loss")) for h in hist if "loss" in h]
        log(f"[{mode}] losses (step, loss): {result['losses']}")
        if torch.cuda.is_available():
            log(f"[{mode}] peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
        log(f"[{mode}] stage time {time.time() - t0:.1f}s")
        save()
    return result



if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", required=True, choices=STAGES)
    ap.add_argument("--plan", required=True, help="the plan.json that tests/fixtures/gpu_unsloth.py's build_plan wrote")
    a = ap.parse_args()
    os.environ.update(OFFLINE)
    os.makedirs(OUT, exist_ok=True)
    try:
        res = stage_train(a.stage, a.plan)
        sys.exit(0 if res.get("ok") else 1)
    except SystemExit:
        raise
    except BaseException:
        traceback.print_exc()
        sys.exit(2)
