"""The demo: the bundled example (examples/data) fine-tuned with the real `llamafactory-cli train`,
vanilla (dies on the cut image run) and, side by side with it, VLPATCH=1 (trains, report written).

Run through `bash scripts/demo.sh`. Exit code 0 only when both halves behave as described.
"""

import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.fixtures.tiny_models import build_tiny_qwen2vl  # noqa: E402

OUT = os.path.join(ROOT, "out", "demo")
MISMATCH = ("Image features and image tokens do not match", "shape mismatch")


def start(label, yaml_path, env):
    """`llamafactory-cli train` in the background, its output into out/demo/LABEL.log."""
    cli = os.path.join(os.path.dirname(sys.executable), "llamafactory-cli")
    with open(os.path.join(OUT, f"{label}.log"), "w", encoding="utf-8") as log:
        return subprocess.Popen([cli, "train", yaml_path], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), time.time()


def finish(label, started):
    proc, t = started
    proc.wait()
    with open(os.path.join(OUT, f"{label}.log"), encoding="utf-8", errors="replace") as fh:
        log = fh.read()
    print(f"[{label}] exit code {proc.returncode} after {time.time() - t:.1f}s (log: out/demo/{label}.log)")
    return proc.returncode, log


def main():
    os.makedirs(OUT, exist_ok=True)
    model = os.path.join(OUT, "model")
    if not os.path.exists(os.path.join(model, "config.json")):
        build_tiny_qwen2vl(model)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLPATCH")}
    env.update(HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    with open(os.path.join(ROOT, "examples", "train_qwen2vl_sft.yaml"), encoding="utf-8") as fh:
        template = fh.read()
    ok, started = True, {}
    for label, extra in (("vanilla", {}), ("vlpatch", {"VLPATCH": "1"})):  # side by side: one core each
        out_dir = os.path.join(OUT, label)
        yaml_path = os.path.join(OUT, f"{label}.yaml")
        with open(yaml_path, "w", encoding="utf-8") as fh:
            fh.write(template.replace("MODEL_DIR", model).replace("OUTPUT_DIR", out_dir))
        shutil.rmtree(out_dir, ignore_errors=True)  # a run before this one: LLaMA-Factory refuses a non-empty output_dir
        started[label] = start(label, yaml_path, {**env, **extra})
    for label in started:
        report = os.path.join(OUT, label, "vlpatch_report.jsonl")
        code, log = finish(label, started[label])
        if label == "vanilla":
            err = next((line for line in log.splitlines() if any(m in line for m in MISMATCH)), None)
            print(f"[vanilla] {err or 'did NOT fail with the vision-token mismatch'}")
            ok &= code != 0 and err is not None
        else:
            summary = next((line for line in log.splitlines() if "vlpatch [" in line), "no vlpatch summary")
            print(f"[vlpatch] {summary.strip()}")
            trained = code == 0 and "train_runtime" in log
            print(f"[vlpatch] {'trained' if trained else 'FAILED'}; report: {os.path.relpath(report, ROOT)}")
            if os.path.exists(report):
                for line in open(report, encoding="utf-8"):
                    r = json.loads(line)
                    print(
                        f"  {r['dataset']}[{r['index']}] {r['action']}: {r['tokens_before']} -> {r['tokens_after']} tokens, "
                        f"media {r['media_tokens']} -> {r['media_tokens_after']} ({r['reason']})"
                    )
            ok &= trained and os.path.exists(report)
    print("demo: OK" if ok else "demo: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
