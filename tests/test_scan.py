"""`vlpatch scan` on a real LLaMA-Factory config: per-sample outcomes without and with vlpatch, the
summary, recommendations, JSON / CSV, and bad input as per-sample entries (never a crash)."""

import csv
import json
import os
import shutil
import sys

import pytest

from tests.conftest import newest_only, require
from tests.fixtures import console
from tests.fixtures.tiny_models import IMAGE_TOKENS, _register, build_long_text_image_dataset, build_text_dataset, write_image, write_train_yaml

pytestmark = [pytest.mark.llamafactory, pytest.mark.heavy]
BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    require("llamafactory")
    d = tmp_path_factory.mktemp("scandata")
    build_long_text_image_dataset(str(d), n=6, name="longimg")
    build_text_dataset(str(d), n=2, name="plaintext")
    write_image(str(d / "ok.png"), seed=9)
    truncated = d / "truncated.png"
    data = (d / "ok.png").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    turn = lambda text: [{"role": "user", "content": text}, {"role": "assistant", "content": "a red square"}]  # noqa: E731
    _register(
        str(d),
        "bad",
        [
            {"messages": turn("<image> fine"), "images": ["ok.png"]},
            {"messages": turn("<image> missing file"), "images": ["nowhere.png"]},
            {"messages": turn("<image> <image> two placeholders, one image"), "images": ["ok.png"]},
            {"messages": turn("<image> truncated file"), "images": ["truncated.png"]},
        ],
        {"messages": "messages", "images": "images"},
    )
    return str(d)


def scan_proc(*args, cwd=None, **env_vars):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLPATCH")}
    env.update(HF_HUB_OFFLINE="1", **env_vars)
    return console.run([os.path.join(BIN, "vlpatch"), "scan", *args, "--no-progress"], env=env, timeout=600, cwd=cwd)


def scan(*args, cwd=None, **env_vars):
    proc = scan_proc(*args, cwd=cwd, **env_vars)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(proc.stderr.splitlines()) <= 3, "no upstream log flood: " + proc.stderr[-3000:]
    return proc.stdout


def test_scan_yaml_matches_what_training_does(tmp_path, tiny_qwen2vl, data_dir):
    # the config tests/test_llamafactory_cli.py trains with: vanilla dies on samples 0, 2, 4, vlpatch cuts their text
    yaml_path = write_train_yaml(str(tmp_path / "train.yaml"), tiny_qwen2vl, data_dir, "longimg,plaintext", str(tmp_path / "out"), 128, bf16=True, deepspeed="ds.json")
    out = json.loads(scan(yaml_path, "--json", "--csv", str(tmp_path / "scan.csv")))
    samples = out["samples"]
    assert len(samples) == 8
    by = {s["index"]: s for s in samples}
    for i in (0, 2, 4):
        assert by[i]["vanilla"] == "crash: media tokens cut" and by[i]["vlpatch"] == "truncated", by[i]
        assert by[i]["media_tokens"] == {"image": [IMAGE_TOKENS + 2]} and by[i]["tokens"] > 128
        # the preview of the cut row: its chat frame first, and the answer after what is left of the prompt
        start = by[i]["preview"]["row_start"]
        assert start.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"), by[i]["preview"]
        assert "before_answer" in by[i]["preview"], by[i]["preview"]
    for i in (1, 3, 5, 6, 7):
        assert not by[i]["preview"], by[i]
    for i in (1, 3, 5, 6, 7):
        assert by[i]["vanilla"] == by[i]["vlpatch"] == "fits", by[i]
    assert out["recommend"]["cutoff_len_for_share"]["1.0"] == max(s["tokens"] for s in samples)
    assert out["recommend"]["image_max_pixels_for_cutoff"]["text_alone_too_long"] == [0, 2, 4]
    # the recommendation says what it covers: not the samples no image size helps
    from vlpatch.scan import summary

    line = next(x for x in summary(out).splitlines() if x.startswith("image_max_pixels"))
    assert "fits cutoff_len 128, except the 3 over it without their images:" in line, line
    with open(tmp_path / "scan.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["vanilla"] for r in rows][:3] == ["crash: media tokens cut", "fits", "crash: media tokens cut"]


def test_scan_summary_and_no_yaml_mode(tiny_qwen2vl, data_dir):
    newest_only("llamafactory", "scan's own options")
    text = scan("--dataset", "longimg", "--dataset-dir", data_dir, "--template", "qwen2_vl", "--model", tiny_qwen2vl,
                "--cutoff-len", "400", "--image-max-pixels", str(224 * 224))
    assert "6 samples" in text and "cutoff_len 400" in text
    assert "fits                                          6              6" in text
    assert "tokens per sample (whole): p50" in text and "<- cutoff_len" in text


def test_scan_a_bare_dataset_file(tiny_qwen2vl, data_dir, tmp_path):
    newest_only("llamafactory", "scan's own options")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    out = json.loads(scan("--dataset-file", os.path.join(data_dir, "longimg.json"), "--template", "qwen2_vl", "--model", tiny_qwen2vl,
                          "--cutoff-len", "128", "--image-max-pixels", str(224 * 224), "--json", TMPDIR=str(scratch)))
    assert [s["vanilla"] for s in out["samples"]][:2] == ["crash: media tokens cut", "fits"]
    assert [s["vlpatch"] for s in out["samples"]][:2] == ["truncated", "fits"]
    assert not [p.name for p in scratch.iterdir() if p.name.startswith("vlpatch-")], "the scan leaves no temporary directory"


def test_scan_policy_drop_media_and_image_size_recommendation(tiny_qwen2vl, data_dir):
    newest_only("llamafactory", "scan's own options")
    # cutoff 60: the 66-token image alone does not fit; drop_media keeps the text, and smaller images would fit
    out = json.loads(scan("--dataset", "longimg", "--dataset-dir", data_dir, "--template", "qwen2_vl", "--model", tiny_qwen2vl,
                          "--cutoff-len", "60", "--image-max-pixels", str(224 * 224), "--policy", "drop_media", "--json",
                          VLPATCH_SHRINK_MIN_PIXELS="56x56"))  # 224x224 is below shrink's default floor (256x256)
    odd = [s for s in out["samples"] if s["index"] % 2 == 1]
    assert {s["vlpatch"] for s in odd} == {"media_dropped"}, odd
    # side by side: what each policy would do with the same samples
    assert all(s["policies"] == {"drop": "dropped", "drop_media": "media_dropped", "shrink": "shrunk", "error": "error"} for s in odd), odd
    from vlpatch.scan import summary

    text = summary(out)
    assert "with vlpatch, per policy             drop   drop_media   shrink   error" in text, text
    assert "  dropped                              6            0        0       0" in text, text
    assert "  shrunk                               0            0        6       0" in text, text
    rec = out["recommend"]["image_max_pixels_for_cutoff"]
    assert rec["value"] and rec["value"] < 224 * 224 and rec["text_alone_too_long"] == [0, 2, 4]


def test_scan_bad_input_gets_entries_not_a_crash(tiny_qwen2vl, data_dir):
    out = json.loads(scan("--dataset", "bad", "--dataset-dir", data_dir, "--template", "qwen2_vl", "--model", tiny_qwen2vl,
                          "--cutoff-len", "400", "--json"))
    by = {s["index"]: s for s in out["samples"]}
    assert by[0]["vanilla"] == "fits"
    for i in (1, 2, 3):  # vanilla training dies on it; vlpatch under drop drops it, as training does
        assert by[i]["vanilla"].startswith("error: ") and by[i]["vlpatch"] == "dropped" and "bad_input" in by[i]["detail"], by[i]
    assert "nowhere.png" in by[1]["vanilla"]
    assert "placeholder" in by[2]["vanilla"].lower() or "image" in by[2]["vanilla"].lower()
    rec = out["recommend"]
    assert rec["covers"] == 1 and rec["of"] == 4 and rec["left_out"] == [1, 2, 3], rec
    text = scan("--dataset", "bad", "--dataset-dir", data_dir, "--template", "qwen2_vl", "--model", tiny_qwen2vl, "--cutoff-len", "400")
    assert "the figures below cover the 1 of 4 samples that could be read; 3 with bad input are left out" in text, text
    assert "cutoff_len keeping 100% of readable samples whole" in text
    assert "with vlpatch under policy drop: 3 dropped" in text, text
    assert out["bad_input"] == {"samples": 3, "of": 4, "max_bad": 0.05, "training_stops": True}, out["bad_input"]
    assert "training with vlpatch stops before it starts: 3 of 4 samples (75%) have bad input, more than VLPATCH_MAX_BAD (5%)" in text


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["drop", "drop_media", "error"])
def test_scan_and_training_classify_bad_input_alike(tmp_path, tiny_qwen2vl, data_dir, policy):
    if policy != "drop":
        newest_only("llamafactory", "one policy on the older releases")
    # the pre-flight and the run must agree: the real `llamafactory-cli train` under the same policy
    out = json.loads(scan("--dataset", "bad", "--dataset-dir", data_dir, "--template", "qwen2_vl", "--model", tiny_qwen2vl,
                          "--cutoff-len", "400", "--json", VLPATCH_POLICY=policy))
    assert out["config"]["policy"] == policy, "scan takes the policy training would use: VLPATCH_POLICY"
    predicted = {s["index"]: s["vlpatch"].split(":")[0] for s in out["samples"]}
    yaml_path = write_train_yaml(str(tmp_path / "train.yaml"), tiny_qwen2vl, data_dir, "bad", str(tmp_path / "out"), 400,
                                 per_device_train_batch_size=1, max_steps=1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLPATCH")}
    # 3 of 4 samples are bad: above VLPATCH_MAX_BAD training stops (below); here each is compared
    env.update(HF_HUB_OFFLINE="1", VLPATCH="1", VLPATCH_POLICY=policy, VLPATCH_MAX_BAD="1", PATH=BIN + os.pathsep + env.get("PATH", ""))
    proc = console.run([os.path.join(BIN, "llamafactory-cli"), "train", yaml_path], env=env, timeout=600, cwd=str(tmp_path))
    report = tmp_path / "out" / "vlpatch_report.jsonl"
    rows = [json.loads(x) for x in report.read_text().splitlines()] if report.exists() else []
    actual = {r["index"]: r["action"] for r in rows}
    if policy == "error":  # training stops at the first bad sample, naming it; scan marks each one an error
        assert proc.returncode != 0 and "vlpatch: sample bad[1]: bad_input" in proc.stdout + proc.stderr
        assert actual == {1: "error"} and {predicted[i] for i in (1, 2, 3)} == {"error"}, (actual, predicted)
    else:
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        assert actual == {i: predicted[i] for i in (1, 2, 3)} == {1: "dropped", 2: "dropped", 3: "dropped"}, (actual, predicted)
        assert predicted[0] == "fits"
    if policy == "drop":  # the default VLPATCH_MAX_BAD (5%): training stops before it starts, as scan said
        assert out["bad_input"]["training_stops"]
        del env["VLPATCH_MAX_BAD"]
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
        proc = console.run([os.path.join(BIN, "llamafactory-cli"), "train", yaml_path], env=env, timeout=600, cwd=str(tmp_path))
        log = proc.stdout + proc.stderr
        assert proc.returncode != 0 and "train_runtime" not in log, log[-3000:]
        assert "vlpatch: 3 of 4 samples (75%) of train bad have bad input, more than VLPATCH_MAX_BAD (5%)" in log, log[-3000:]
        assert "First: bad[1]: bad_input" in log, log[-3000:]


def test_scan_missing_files_are_one_clear_line(tmp_path, tiny_qwen2vl, data_dir):
    newest_only("llamafactory", "scan's own options")
    cases = [
        (("nowhere.yaml",), "vlpatch scan: cannot read the config nowhere.yaml: FileNotFoundError"),
        (("--dataset-file", "nowhere.json", "--template", "qwen2_vl", "--model", tiny_qwen2vl), "vlpatch scan: no such dataset file: nowhere.json"),
        (("--dataset", "nosuch", "--dataset-dir", data_dir, "--template", "qwen2_vl", "--model", tiny_qwen2vl),
         "vlpatch scan: loading the dataset"),
        (("--dataset", "longimg", "--dataset-dir", data_dir, "--template", "qwen2_vl", "--model", str(tmp_path / "nomodel")),
         "vlpatch scan: "),
        (("--dataset", "longimg", "--dataset-dir", data_dir, "--template", "qwen2_vl", "--model", tiny_qwen2vl, "--cutoff-len", "64"),
         "vlpatch scan: VLPATCH_POLICY='dropmedia' is not a policy"),
    ]
    for args, first in cases:
        env = {"VLPATCH_POLICY": "dropmedia"} if "64" in args else {}
        proc = scan_proc(*args, cwd=str(tmp_path), **env)
        assert proc.returncode == 2 and proc.stdout == "", (args, proc.stdout[-2000:], proc.stderr[-2000:])
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(first) and "Traceback" not in proc.stderr, (args, proc.stderr[-3000:])


def test_image_size_recommendation_stops_where_an_image_would_vanish(tiny_qwen2vl, tmp_path):
    # an 8000x1 strip: shrinking image_max_pixels far enough makes LLaMA-Factory's resize produce 0 px
    from PIL import Image
    from transformers import AutoProcessor

    from vlpatch import scan as vscan

    strip = str(tmp_path / "strip.png")
    Image.new("L", (8000, 1)).save(strip)
    proc = AutoProcessor.from_pretrained(tiny_qwen2vl)
    args = type("A", (), {"image_max_pixels": 768 * 768, "image_min_pixels": 32 * 32})()
    sample = vscan.Sample(0, tokens=400, text_tokens=40, media_tokens={"image": [360]}, images=[strip])
    rec = vscan._max_pixels_for([sample], 60, proc, args)
    assert rec["value"] is None and "shrinks to nothing" in rec["why"], rec


def test_scan_in_two_workers_equals_one_process_and_names_file_rows(tmp_path, tiny_qwen2vl, data_dir):
    # the same config scanned by one process and by two forked workers: the same result per sample; rows
    # name the dataset and file row they came from (plaintext's rows follow longimg's 6 in the merged data)
    yaml_path = write_train_yaml(str(tmp_path / "train.yaml"), tiny_qwen2vl, data_dir, "longimg,plaintext,bad", str(tmp_path / "out"), 128)
    one = json.loads(scan(yaml_path, "--json", "--workers", "1"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLPATCH")}
    proc = console.run([os.path.join(BIN, "vlpatch"), "scan", yaml_path, "--json", "--workers", "2", "--plot", str(tmp_path / "scan.png")],
                       env={**env, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(proc.stdout)
    assert one["workers"] == 1 and two["workers"] == 2
    assert one["samples"] == two["samples"]
    assert one["recommend"] == two["recommend"]
    names = [(s["source_dataset"], s["source_row"]) for s in two["samples"]]
    assert names == [("longimg", i) for i in range(6)] + [("plaintext", 0), ("plaintext", 1)] + [("bad", i) for i in range(4)]
    # one progress bar over both workers, ending at every pass of every sample
    # (over-long samples: vanilla, vlpatch under drop, drop_media and shrink; bad ones: the three policies)
    passes = len(names) + sum(4 for s in two["samples"] if s["tokens"] and s["tokens"] > 128) + 3 * 3
    assert f"{passes}/{passes}" in proc.stderr.replace("\r", "\n").splitlines()[-1] or f"{passes}/{passes}" in proc.stderr, proc.stderr[-1000:]
    with open(tmp_path / "scan.png", "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    text = scan(yaml_path, "--workers", "2")
    assert "2 workers" in text and "  sample bad[1]: error: " in text, text


def test_the_policy_passes_start_from_the_whole_pass_encode(tiny_qwen2vl, data_dir, monkeypatch):
    """The scan encodes each over-long sample uncut once, in its whole-sample pass: the policy passes
    decide on that encode (its budget splits and learned spans) rather than encode it again."""
    newest_only("llamafactory", "scan's own passes")
    from vlpatch import scan as vscan
    from vlpatch.integrations import llamafactory as lf_integration

    encodes = []
    real = lf_integration._Encode.encode

    def counting(self, bound):
        encodes.append(self.sample)
        return real(self, bound)

    monkeypatch.setattr(lf_integration._Encode, "encode", counting)
    for key in [k for k in os.environ if k.startswith("VLPATCH")]:
        monkeypatch.delenv(key)
    config = {"model_name_or_path": tiny_qwen2vl, "dataset": "longimg", "dataset_dir": data_dir, "template": "qwen2_vl",
              "cutoff_len": 128, "stage": "sft", "finetuning_type": "full"}
    out = vscan.scan(config, policy="drop")
    over = [s for s in out["samples"] if s["tokens"] > 128]
    assert len(over) == 3 and all(s["vlpatch"] == "truncated" for s in over), out["samples"]
    assert encodes == [], f"the policy passes encoded again: {encodes}"
