"""Upstream-free unit tests of vlpatch's settings table (vlpatch/settings.py) and its report writer
(vlpatch/report.py): what every patch relies on, checked without a trainer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from vlpatch import core, report
from vlpatch import settings as vs


# --------------------------------------------------------------------------- settings


def test_every_field_setting_parses_its_default_text_back():
    """A setting that fills a Config field: the text apply() publishes for a value other than the
    default parses back to that value (what a spawned worker reads)."""
    examples = {"policy": "shrink", "report": "/tmp/r.jsonl", "media_first": True, "max_bad": 0.25,
                "shrink_min_pixels": 128 * 128, "shrink_min_frames": 2, "shrink_fallback": "error", "shrink_dir": "/tmp/m"}
    for field, value in examples.items():
        setting = vs.FIELDS[field]
        assert setting.publish, field
        text = vs.published(setting, value)
        assert text is not None and vs.parse(setting, text) == value, (field, text)
        assert vs.CHECKS[setting.kind](setting.name, text) is None, (field, text)
    for field, setting in vs.FIELDS.items():
        if setting.publish == "changed":
            assert vs.published(setting, setting.default) is None, f"{field}: its default is published"
    assert vs.published(vs.FIELDS["policy"], "drop") == "drop"  # always: workers see the policy in force


def test_the_settings_check_names_the_setting_the_value_and_the_closest():
    problems = vs.check_env({"VLPATCH_POLCY": "drop", "VLPATCH_POLICY": "dropmedia", "VLPATCH_MAX_BAD": "7",
                             "VLPATCH_SHRINK_MIN_PIXELS": "big", "VLPATCH_TEST_CORES": "anything", "HOME": "/"}, lambda: [])
    text = "\n".join(problems)
    assert "VLPATCH_POLCY is not a vlpatch setting" in text and "did you mean 'VLPATCH_POLICY'" in text
    assert "VLPATCH_POLICY='dropmedia' is not a policy" in text and "did you mean 'drop_media'" in text
    assert "VLPATCH_MAX_BAD='7' is not a share" in text and "VLPATCH_SHRINK_MIN_PIXELS='big' is not a pixel count" in text
    assert len(problems) == 4, problems  # tooling settings are known and not checked; other variables ignored


def test_values_in_their_forms():
    assert vs.parse_pixels("256x256") == vs.parse_pixels(65536) == 65536 and vs.parse_pixels(0) is None
    assert vs.parse_share("5%") == vs.parse_share("0.05") == 0.05 and vs.parse_share(1.5) is None
    assert vs.parse_frames("4") == 4 and vs.parse_frames(True) is None
    assert vs.parse(vs.FIELDS["exclude"], "a, b,,c") == frozenset({"a", "b", "c"})
    assert vs.parse(vs.FIELDS["force"], " Yes ") is True and vs.parse(vs.FIELDS["log_level"], "debug") == "DEBUG"
    assert vs.check_fallback("x", "shrink") is not None and vs.check_fallback("x", "error") is None


def test_the_policy_names_are_the_cores_policies_in_order():
    assert tuple(core.POLICIES) == vs.POLICY_NAMES
    assert [p for p in vs.POLICY_NAMES if core.get_policy(p).reencodes] == ["shrink"]
    assert [p for p in vs.POLICY_NAMES if core.get_policy(p).stops] == ["error"]
    assert vs.FALLBACKS == ("drop", "drop_media", "error")


# --------------------------------------------------------------------------- report


@pytest.fixture
def clean_run(monkeypatch):
    monkeypatch.delenv("VLPATCH_RUN", raising=False)
    monkeypatch.delenv("VLPATCH_REPORT", raising=False)
    yield
    report._current = None


def test_a_run_sums_every_process_tallies_and_its_rows_name_it(tmp_path, clean_run, caplog):
    path = str(tmp_path / "out" / "report.jsonl")
    run = report.start_run("trainer", "train data (stage sft)", path, dataset="data")
    report.tally(Counter({"kept": 3, "truncated": 1}), Counter({"text_over_budget": 1}))
    report.write_rows([{"index": 4, "action": "truncated", "reason": "text_over_budget"}])
    # a worker process of the same run (it inherits VLPATCH_RUN) tallies and writes too
    code = ("from collections import Counter; from vlpatch import report; "
            "report.tally(Counter({'dropped': 1}), Counter({'media_exceed_budget': 1})); "
            "report.write_rows([{'index': 7, 'action': 'dropped', 'reason': 'media_exceed_budget: x'}])")
    env = {k: v for k, v in os.environ.items() if k != "VLPATCH"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    rows = report.run_rows(run)
    with caplog.at_level("WARNING", logger="vlpatch"):
        counts = report.end_run(run)
    assert counts == Counter({"kept": 3, "truncated": 1, "dropped": 1})
    assert run.reasons == Counter({"text_over_budget": 1, "media_exceed_budget": 1})
    assert [r["index"] for r in rows] == [4, 7] and {r["run_id"] for r in rows} == {run.run_id}
    assert all(r["dataset"] == "data" and r["trainer"] == "trainer" for r in rows)
    assert "samples: 3 kept, 1 truncated, 0 media_dropped, 1 dropped" in caplog.text and path in caplog.text
    assert "VLPATCH_RUN" not in os.environ and report.current_run() is None
    with open(path, encoding="utf-8") as fh:
        assert [json.loads(line)["index"] for line in fh] == [4, 7]


def test_the_run_a_worker_reads_is_the_one_published(clean_run, tmp_path):
    run = report.start_run("trainer", "label", str(tmp_path / "r.jsonl"))
    again = report.ReportRun.from_env()
    assert again.run_id == run.run_id and again.meta == run.meta and again.reasons == Counter()
    assert report.ReportRun.from_env() is again  # the same text is parsed once
    report.end_run(run, quiet=True)


def test_a_shrunk_items_report_entry():
    before = [core.Run("image", 0, 100, 0), core.Run("video", 100, 300, 0)]
    after = [core.Run("image", 0, 25, 0), core.Run("video", 25, 75, 0)]
    assert report.resized_row(("image", 0), (640, 480), (320, 240), before, after) == {
        "item": "image#0", "before": [640, 480], "after": [320, 240], "tokens_before": 100, "tokens_after": 25}
    video = report.resized_row(("video", 0), (640, 480, 16), (320, 240, 8), before, after)
    assert (video["tokens_before"], video["tokens_after"], video["frames_before"], video["frames_after"]) == (200, 50, 16, 8)


def test_reason_codes_and_the_bad_input_share():
    """A decision carries its code as data (what the summary counts); its reason starts with it."""
    assert core.because("media_exceed_budget", "the media need 900 of 512 tokens") == {
        "code": "media_exceed_budget", "reason": "media_exceed_budget: the media need 900 of 512 tokens"}
    with pytest.raises(AssertionError):
        core.because("no_such_code", "")
    assert core.Decision("truncated", [[0]]).code == core.TEXT_OVER_BUDGET == "text_over_budget"
    assert not core.too_much_bad(5, 100, 0.05) and core.too_much_bad(6, 100, 0.05) and not core.too_much_bad(0, 0, 0.0)
    summary = report.format_summary(Counter({"kept": 2, "dropped": 1}), Counter({"bad_input": 1}), None)
    assert summary == "samples: 2 kept, 0 truncated, 0 media_dropped, 1 dropped; reasons: bad_input x1; no report file set"


def test_a_sample_error_survives_pickling():
    """A worker process (datasets.map, a data loader) hands its error back pickled: sample and reason stay."""
    import pickle

    from vlpatch.errors import SampleError

    err = pickle.loads(pickle.dumps(SampleError("dataset row 3", "media do not fit", "image#0")))
    assert (err.sample, err.reason, err.detail) == ("dataset row 3", "media do not fit", "image#0")
    assert str(err) == "vlpatch: sample dataset row 3: media do not fit (image#0)"
