#!/usr/bin/env python3
"""GPU check: the real `unsloth` (FastVisionModel + LoRA + TRL's SFTTrainer + UnslothVisionDataCollator) on a
tiny offline Qwen2-VL, vanilla and with vlpatch, on a dataset with two-image conversations and samples whose
text-first cut lands inside an image run.

Run it through scripts/gpu_unsloth_check.sh (installs the wheels carried in .whl/ into /tmp/site first), or:

    PYTHONPATH=/tmp/site:$PWD OUT=/some/dir python3 scripts/gpu_unsloth_check.py

Stages, each in its own process so that one failure still lets the others run and print:
  build    the tiny Qwen2-VL (random weights, tests/fixtures/tiny_models.py) and the dataset plan: word counts
           chosen with the real processor so that the cut at max_seq_length lands inside an image run
  vanilla  upstream unsloth, no vlpatch: the collator alone, then SFTTrainer (the upstream error is expected)
  patched  `import vlpatch; vlpatch.apply()` before `import unsloth`: the same, training must finish
  shrink   the same with VLPATCH_POLICY=shrink: the image too large for max_seq_length is downsized, not dropped
  qlora    as shrink, with the model loaded in 4 bits (QLoRA: load_in_4bit=True, bitsandbytes), the way unsloth's
           notebooks load it
  video    VLPATCH_POLICY=shrink on conversations with a 16-frame video (frames in the message part): each keeps
           fewer frames until it fits; video tokens per row checked against video_grid_thw
Every batch the collator returns is checked: image tokens per row against image_grid_thw, runs whole, rows
within max_seq_length. Output: stdout, and under $OUT: <stage>.log, result_<stage>.json, vlpatch_report.jsonl,
summary.json. No model hub: HF_HUB_OFFLINE=1. Without a GPU it runs as a CPU dry run (UNSLOTH_ALLOW_CPU=1).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

OUT = os.environ.get("OUT") or os.path.join(REPO, "out", "gpu_unsloth_check")
WORK = os.environ.get("GPU_CHECK_WORK") or "/tmp/vlpatch_gpu_check"
MAX_LEN = int(os.environ.get("GPU_CHECK_MAX_LEN", "192"))
STEPS = int(os.environ.get("GPU_CHECK_STEPS", "4"))
BUDGET = float(os.environ.get("GPU_CHECK_BUDGET", "540"))  # seconds for all stages together
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false"}
DISTS = ["torch", "torchvision", "triton", "transformers", "tokenizers", "unsloth", "unsloth_zoo", "trl", "datasets",
         "peft", "accelerate", "bitsandbytes", "xformers", "torchao", "cut_cross_entropy", "numpy", "pillow",
         "fsspec", "huggingface_hub", "wrapt", "packaging", "pyyaml"]


def log(*parts):
    print(*parts, flush=True)


def banner(title):
    log("")
    log("=" * 100)
    log(f"== {title}")
    log("=" * 100)


def versions() -> dict:
    from importlib import metadata

    found = {}
    for name in DISTS:
        try:
            dist = metadata.distribution(name)
            where = str(dist.locate_file(""))
            found[name] = f"{dist.version}  ({where})"
        except Exception:
            found[name] = "not installed"
    return found


def print_versions(prefix=""):
    for name, v in versions().items():
        log(f"{prefix}{name:18s} {v}")


# --------------------------------------------------------------------------- the dataset plan

def _text(n_words, seed):
    from tests.fixtures.tiny_models import long_text

    return long_text(n_words, seed)


def make_example(spec):
    """spec: {"parts": [["text", n_words, seed] | ["image", side, seed] | ["video", side, frames, seed], ...],
    "answer": str}. Images go to the `images` column; a video is a list of frames in its message part."""
    from PIL import Image

    content, images = [], []
    for kind, a, b, *more in spec["parts"]:
        if kind == "text":
            content.append({"type": "text", "text": _text(a, b) + " "})
        elif kind == "video":
            frames = [Image.new("RGB", (a, a), ((40 * (more[0] + f)) % 255, 100, 150)) for f in range(b)]
            content.append({"type": "video", "video": frames, "resized_height": a, "resized_width": a})
        else:
            content.append({"type": "image"})
            images.append(Image.new("RGB", (a, a), ((40 * b) % 255, 100 + 10 * b % 100, 150)))
    example = {
        "messages": [
            {"role": "user", "content": content},
            {"role": "assistant", "content": [{"type": "text", "text": spec["answer"]}]},
        ],
    }
    if not any(part[0] == "video" for part in spec["parts"]):  # a video example has no images column
        example["images"] = images
    return example


def image_runs(ids, image_id):
    """[(start, length)] of the runs of image_id in the list ids."""
    runs, j = [], 0
    while j < len(ids):
        if ids[j] == image_id:
            k = j
            while k < len(ids) and ids[k] == image_id:
                k += 1
            runs.append((j, k - j))
            j = k
        else:
            j += 1
    return runs


def full_row(processor, example):
    text = processor.apply_chat_template(example["messages"], tokenize=False, add_generation_prompt=False)
    out = processor(text=[text], images=example["images"] or None, return_tensors="pt")
    return out["input_ids"][0].tolist()


def stage_build():
    """Build the tiny model; choose word counts so that the vanilla cut lands inside an image run."""
    from tests.fixtures import tiny_models

    model_dir = os.path.join(WORK, "tiny_qwen2vl")
    shutil.rmtree(model_dir, ignore_errors=True)
    t = time.time()
    try:
        tiny_models.build_tiny_qwen2vl(model_dir)
    except Exception:
        log("build_tiny_qwen2vl failed:")
        traceback.print_exc()
        try:
            import torchvision  # noqa: F401
        except Exception as exc:
            log(f"(torchvision does not import: {exc!r}; transformers 5.x needs it for Qwen2-VL's video processor)")
        raise
    log(f"tiny Qwen2-VL built in {time.time() - t:.1f}s at {model_dir}: {sorted(os.listdir(model_dir))}")
    from transformers import AutoConfig, AutoProcessor

    cfg = AutoConfig.from_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    log(f"processor {type(processor).__name__}, image processor {type(processor.image_processor).__name__}, "
        f"video processor {type(getattr(processor, 'video_processor', None)).__name__}")
    image_id = cfg.image_token_id
    budget = MAX_LEN

    def lands_inside(spec, which):
        ids = full_row(processor, make_example(spec))
        runs = image_runs(ids, image_id)
        start, length = runs[which]
        return len(ids), runs, start < budget < start + length

    plan = []

    def add(name, spec, note):
        ids = full_row(processor, make_example(spec))
        runs = image_runs(ids, image_id)
        plan.append({"name": name, "spec": spec, "tokens": len(ids), "image_runs": runs, "note": note})

    one = lambda w: {"parts": [["text", w, 1], ["image", 224, 1], ["text", 3, 2]], "answer": "a red square"}  # noqa: E731
    two = lambda w1, w2: {  # noqa: E731
        "parts": [["text", w1, 3], ["image", 224, 2], ["text", w2, 4], ["image", 224, 3], ["text", 2, 5]],
        "answer": "two squares"}
    add("short_1img", one(5), "fits")
    add("short_2img", two(4, 4), "two images, fits")
    # the long ones: the first word count whose cut at max_seq_length falls inside the (last) image run
    for name, maker, which in (("long_1img_cut", lambda w: one(w), 0), ("long_2img_cut", lambda w: two(4, w), 1)):
        chosen = None
        for w in range(20, 400, 3):
            n, runs, inside = lands_inside(maker(w), which)
            if inside and budget - runs[which][0] >= 8:
                chosen = w
                break
        if chosen is None:
            raise RuntimeError(f"no word count puts the cut inside image run {which} for {name}")
        add(name, maker(chosen), f"over max_seq_length {budget}: the text-first cut lands inside image run {which}")
    add("big_image_alone_too_long", {"parts": [["text", 3, 6], ["image", 448, 4]], "answer": "big"},
        f"one 448 px image: its run alone exceeds max_seq_length {budget} (vlpatch policy drop)")
    order = ["short_1img", "long_1img_cut", "short_2img", "long_2img_cut", "short_2img", "big_image_alone_too_long",
             "long_1img_cut", "short_1img"]
    by = {p["name"]: p for p in plan}
    dataset = [by[n] for n in order]
    for p in plan:
        log(f"  {p['name']:26s} tokens {p['tokens']:4d}  image runs (start, length) {p['image_runs']}  - {p['note']}")
    with open(os.path.join(WORK, "plan.json"), "w") as fh:
        # the video stage: 16 frames of 56 px (Qwen2-VL's video processor upscales them to its minimum size,
        # about 128 tokens a pair of frames, so 8 pairs are far over max_seq_length)
        video = [{"name": f"video_{k}", "spec": {"parts": [["text", 4 + 3 * k, 10 + k], ["video", 56, 16, k], ["text", 3, 20 + k]],
                                                  "answer": "a moving square"}} for k in range(4)]
        json.dump({"max_len": budget, "model_dir": model_dir, "image_token_id": image_id, "dataset": dataset,
                   "video_token_id": cfg.video_token_id, "video_dataset": video}, fh)
    return {"ok": True, "plan": [{k: p[k] for k in ("name", "tokens", "image_runs", "note")} for p in plan]}


# --------------------------------------------------------------------------- a training run

def stage_train(mode):
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

    with open(os.path.join(WORK, "plan.json")) as fh:
        plan = json.load(fh)
    max_len, image_id = plan["max_len"], plan["image_token_id"]
    grid_key, pixel_key, rows_key = "image_grid_thw", "pixel_values", "dataset"
    if mode == "video":  # the same checks on the video tokens
        image_id, grid_key, pixel_key, rows_key = plan["video_token_id"], "video_grid_thw", "pixel_values_videos", "video_dataset"

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
        """Image tokens per row vs image_grid_thw, runs whole and in order, rows within max_len."""
        info = {"where": where, "batch": counter["n"], "examples": len(examples),
                "images_in": [len(e.get("images") or []) for e in examples]}
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        grid = batch.get(grid_key)
        merge = 4
        grid_tokens = [int(x) for x in (grid.prod(dim=-1) // merge).tolist()] if grid is not None else []
        rows, runs_all, problems = [], [], []
        for i in range(ids.shape[0]):
            row = ids[i][mask[i].bool()].tolist() if mask is not None else ids[i].tolist()
            runs = [length for _, length in image_runs(row, image_id)]
            rows.append(len(row))
            runs_all.append(runs)
            if len(row) > max_len:
                problems.append(f"row {i} has {len(row)} tokens > max_seq_length {max_len}")
        flat = [r for runs in runs_all for r in runs]
        if flat != grid_tokens:
            problems.append(f"{'video' if mode == 'video' else 'image'} runs {flat} != {grid_key} tokens {grid_tokens}")
        if grid is not None and pixel_key in batch:
            patches = int(grid.prod(dim=-1).sum())
            if batch[pixel_key].shape[0] != patches:
                problems.append(f"{pixel_key} rows {batch[pixel_key].shape[0]} != grid patches {patches}")
        if "labels" in batch and batch["labels"].shape != ids.shape:
            problems.append(f"labels {tuple(batch['labels'].shape)} != input_ids {tuple(ids.shape)}")
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
        pairs = [("long_2img_cut", "short_2img"), ("long_1img_cut", "short_1img"), ("big_image_alone_too_long", "short_1img")]
        for pair in pairs if mode != "video" else [("video_0", "video_1")]:
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
            output_dir=os.path.join(WORK, f"trainer_{mode}"), per_device_train_batch_size=2,
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


# --------------------------------------------------------------------------- the driver

def run_stage(stage, timeout, env):
    """Run `stage` in a child process, streaming its output with a prefix into stdout and $OUT/<stage>.log."""
    banner(f"stage {stage} (timeout {timeout:.0f}s)")
    if timeout < 20:
        log(f"skipped: only {timeout:.0f}s left")
        return {"stage": stage, "rc": None, "skipped": True}
    cmd = [sys.executable, "-u", os.path.abspath(__file__), "--stage", stage]
    t = time.time()
    path = os.path.join(OUT, f"{stage}.log")
    with open(path, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=WORK, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", bufsize=1, start_new_session=True)
        timed_out = False
        import threading

        def reader():
            for line in proc.stdout:
                fh.write(line)
                fh.flush()
                sys.stdout.write(f"[{stage}] {line}" if line.strip() else line)
                sys.stdout.flush()

        th = threading.Thread(target=reader, daemon=True)
        th.start()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            log(f"!!! stage {stage} ran past {timeout:.0f}s: killing it")
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except Exception:
                proc.kill()
            proc.wait()
        th.join(timeout=5)
    rc = proc.returncode
    log(f"stage {stage}: rc {rc}{' (timed out)' if timed_out else ''}, {time.time() - t:.1f}s, log {path}")
    res = {"stage": stage, "rc": rc, "timed_out": timed_out, "seconds": round(time.time() - t, 1)}
    rp = os.path.join(OUT, f"result_{stage}.json")
    if os.path.exists(rp):
        with open(rp) as fh2:
            res["result"] = json.load(fh2)
    return res


def main():
    t0 = time.time()
    os.makedirs(OUT, exist_ok=True)
    os.makedirs(WORK, exist_ok=True)
    for name in ("vlpatch_report.jsonl", "vlpatch_report_shrink.jsonl", "vlpatch_report_video.jsonl",
                 "vlpatch_report_qlora.jsonl", "result_build.json", "result_qlora.json",
                 "result_vanilla.json", "result_patched.json", "result_shrink.json", "result_video.json"):
        try:
            os.remove(os.path.join(OUT, name))
        except FileNotFoundError:
            pass
    banner("environment")
    log(f"time {time.strftime('%Y-%m-%d %H:%M:%S')}, python {sys.version.split()[0]} ({sys.executable}), cwd {os.getcwd()}")
    log(f"PYTHONPATH={os.environ.get('PYTHONPATH')}")
    log(f"OUT={OUT} WORK={WORK} max_seq_length={MAX_LEN} steps={STEPS} budget={BUDGET:.0f}s")
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        log(f"nvidia-smi: {smi.stdout.strip() or smi.stderr.strip()}")
    except Exception as exc:
        log(f"nvidia-smi: {exc!r}")
    print_versions()
    env = dict(os.environ, **OFFLINE)
    env.pop("VLPATCH", None)
    env["PYTHONPATH"] = os.pathsep.join([p for p in [env.get("PYTHONPATH", ""), REPO] if p])
    try:
        import torch

        cuda = torch.cuda.is_available()
        log(f"torch {torch.__version__}, cuda available: {cuda}" + (f", {torch.cuda.get_device_name(0)}" if cuda else ""))
    except Exception as exc:
        cuda = False
        log(f"torch does not import: {exc!r}")
    if not cuda:
        env.setdefault("UNSLOTH_ALLOW_CPU", "1")
        log("NO GPU: CPU dry run with UNSLOTH_ALLOW_CPU=1 (unsloth's GPU code path on CPU; may fail where it needs CUDA)")
    results = {"build": run_stage("build", min(150, BUDGET), env)}
    if results["build"].get("rc") != 0:
        banner("build failed: nothing to train")
    else:
        left = lambda: BUDGET - (time.time() - t0)  # noqa: E731
        results["vanilla"] = run_stage("vanilla", min(130, left() - 260), env)
        penv = dict(env, VLPATCH_REPORT=os.path.join(OUT, "vlpatch_report.jsonl"), VLPATCH_LOG_LEVEL="INFO")
        results["patched"] = run_stage("patched", min(170, left() - 130), penv)
        senv = dict(penv, VLPATCH_REPORT=os.path.join(OUT, "vlpatch_report_shrink.jsonl"), VLPATCH_POLICY="shrink")
        results["shrink"] = run_stage("shrink", min(150, left() - 100), senv)
        qenv = dict(senv, VLPATCH_REPORT=os.path.join(OUT, "vlpatch_report_qlora.jsonl"))
        results["qlora"] = run_stage("qlora", min(150, left() - 100), qenv)
        venv = dict(senv, VLPATCH_REPORT=os.path.join(OUT, "vlpatch_report_video.jsonl"), VLPATCH_SHRINK_MIN_FRAMES="2")
        results["video"] = run_stage("video", left() - 10, venv)
    summary(results)
    with open(os.path.join(OUT, "summary.json"), "w") as fh:
        json.dump(results, fh, indent=1, default=str)
    log(f"total {time.time() - t0:.1f}s")


def summary(results):
    banner("summary")
    b = results.get("build", {}).get("result") or {}
    for p in b.get("plan", []):
        log(f"plan: {p['name']:26s} {p['tokens']:4d} tokens, image runs {p['image_runs']}  {p['note']}")
    for mode in ("vanilla", "patched", "shrink", "qlora", "video"):
        r = results.get(mode)
        if not r:
            continue
        res = r.get("result") or {}
        log(f"--- {mode}: rc {r.get('rc')}{' TIMED OUT' if r.get('timed_out') else ''}, {r.get('seconds')}s, "
            f"training finished: {res.get('ok')}; FastVisionModel.from_pretrained ok: {bool(res.get('fast_vision_model'))}, "
            f"get_peft_model ok: {bool(res.get('fast_vision_peft'))}"
            + (f"; 4-bit modules {res.get('four_bit_modules')}" if mode == "qlora" else "")
            + ("; FALLBACK model (plain transformers + peft) used" if res.get("fallback_model") else ""))
        for row in res.get("status", []):
            log(f"    vlpatch.status {row.get('id')}: {row.get('state')} - {row.get('reason')} {row.get('parts', '')}")
        for bt in res.get("batches", []):
            log(f"    {bt['where']:7s} batch {bt['batch']}: images in {bt['images_in']}, shape {bt['shape']}, "
                f"row tokens {bt['row_tokens']}, image tokens {bt['image_tokens']} vs grid {bt['grid_sum']} "
                f"{'OK' if bt['ok'] else 'MISMATCH ' + '; '.join(bt['problems'])}")
        for e in res.get("collator_errors", []):
            log(f"    collator error: {e[:300]}")
        for e in res.get("errors", []):
            log(f"    error in {e['where']}: {e['type']}: {e['message'][:300]}")
        log(f"    losses: {res.get('losses')}")
    van = (results.get("vanilla") or {}).get("result") or {}
    expected = any("token count" in e or "image" in e.lower() for e in van.get("collator_errors", []))
    log(f"VANILLA: upstream error seen: {expected}; training finished: {van.get('ok')}")
    for mode, report in (("patched", "vlpatch_report.jsonl"), ("shrink", "vlpatch_report_shrink.jsonl"),
                         ("qlora", "vlpatch_report_qlora.jsonl"), ("video", "vlpatch_report_video.jsonl")):
        pat = (results.get(mode) or {}).get("result") or {}
        bad = [bt for bt in pat.get("batches", []) if not bt["ok"]]
        log(f"{mode.upper()}: training finished: {pat.get('ok')}; batches checked {len(pat.get('batches', []))}, "
            f"mismatches {len(bad)}; losses {[l for _, l in pat.get('losses', [])]}")
        rp = os.path.join(OUT, report)
        if not os.path.exists(rp):
            log(f"vlpatch report ({mode}): no file written")
            continue
        with open(rp) as fh:
            lines = fh.read().splitlines()
        log(f"vlpatch report {rp}: {len(lines)} row(s)")
        keys = ("index", "stage", "action", "reason", "budget", "tokens_before", "tokens_after", "text_tokens_before",
                "text_tokens_after", "media_tokens", "media_tokens_after", "media", "media_removed", "media_resized")
        for line in lines:
            try:
                row = json.loads(line)
                log("    " + json.dumps({k: row.get(k) for k in keys if k in row}))
            except Exception:
                log("    " + line[:500])


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=["build", "vanilla", "patched", "shrink", "qlora", "video"])
    a = ap.parse_args()
    if a.stage is None:
        main()
    else:
        os.environ.update(OFFLINE)
        os.makedirs(OUT, exist_ok=True)
        try:
            res = stage_build() if a.stage == "build" else stage_train(a.stage)
            with open(os.path.join(OUT, f"result_{a.stage}.json"), "w") as fh:
                json.dump(res, fh, indent=1, default=str)
            sys.exit(0 if res.get("ok") else 1)
        except SystemExit:
            raise
        except BaseException:
            traceback.print_exc()
            sys.exit(2)
