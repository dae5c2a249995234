"""The documentation says what the code does: README.md, docs/*.md and DEVELOPMENT.md against the settings
table (vlpatch/settings.py), the command line (vlpatch/cli.py), the report's reason codes, the files they
link to and the commands .ci/run runs. Upstream-free and fast: imports vlpatch and the standard library only
(the wheel test runs uv, as scripts/setup.sh installs it).

The README's two generated tables (`vlpatch coverage`, `vlpatch releases`) are checked by tests/test_matrix.py.
"""

from __future__ import annotations

import argparse
import glob
import inspect
import os
import re
import sys

import pytest

import vlpatch
from vlpatch import cli, core, report
from vlpatch.settings import SETTINGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DEVELOPMENT = os.path.join(ROOT, "DEVELOPMENT.md")
DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
USER_DOCS = [README, *DOCS]  # what users read: every VLPATCH_* name there is a real setting
ALL_DOCS = [*USER_DOCS, DEVELOPMENT, os.path.join(ROOT, "CHANGELOG.md")]
README_MAX_LINES = 300

# misspellings the docs show on purpose (what the settings check says about them): never real settings
TYPO_EXAMPLES = {"VLPATCH_POLCY"}

NAME = re.compile(r"\bVLPATCH(?:_[A-Z0-9]+)*\b")


def read(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


def test_the_documents_exist():
    names = {os.path.basename(p) for p in DOCS}
    expected = {"configuration.md", "policies.md", "report.md", "scan.md", "llamafactory.md", "unsloth.md", "trl.md",
                "architecture.md", "performance.md"}
    assert expected <= names, f"docs/ lacks {sorted(expected - names)}"
    for path in ALL_DOCS:
        assert os.path.isfile(path), rel(path)


def test_every_setting_is_documented_in_configuration():
    text = read(os.path.join(ROOT, "docs", "configuration.md"))
    documented = set(NAME.findall(text))
    missing = sorted(set(SETTINGS) - documented)
    assert not missing, f"docs/configuration.md does not document {missing} (vlpatch/settings.py's table)"


def test_every_apply_argument_is_documented_in_configuration():
    text = read(os.path.join(ROOT, "docs", "configuration.md"))
    for name in inspect.signature(vlpatch.apply).parameters:
        assert f"`{name}`" in text, f"docs/configuration.md does not document apply({name}=...)"


def test_every_setting_the_docs_name_exists():
    for path in USER_DOCS:
        for name in sorted(set(NAME.findall(read(path))) - TYPO_EXAMPLES):
            assert name in SETTINGS, f"{rel(path)} names {name}, which is not in vlpatch/settings.py's table"
    for name in sorted(set(NAME.findall(read(DEVELOPMENT))) - TYPO_EXAMPLES):
        assert name in SETTINGS, f"DEVELOPMENT.md names {name}, which is not in vlpatch/settings.py's table"
    assert not TYPO_EXAMPLES & set(SETTINGS)


def test_every_tooling_setting_is_still_read():
    """A tooling setting is read by the scripts, the noxfile or the tests (else the table, and
    DEVELOPMENT.md, describe something gone); DEVELOPMENT.md names each."""
    paths = [*glob.glob(os.path.join(ROOT, "scripts", "*")), os.path.join(ROOT, "noxfile.py"),
             *glob.glob(os.path.join(ROOT, "tests", "**", "*.py"), recursive=True)]
    sources = "".join(read(p) for p in paths if os.path.isfile(p) and os.path.abspath(p) != os.path.abspath(__file__))
    development = read(DEVELOPMENT)
    for name, setting in sorted(SETTINGS.items()):
        if setting.kind == "tooling":
            assert name in sources, f"nothing reads the tooling setting {name} any more: take it out of the table"
            assert name in development, f"DEVELOPMENT.md does not name the tooling setting {name}"


def parser() -> argparse.ArgumentParser:
    """The `vlpatch` command's parser, as cli.main builds it (caught at parse_args, nothing runs)."""

    class Built(Exception):
        pass

    def catch(self, *args, **kwargs):
        raise Built(self)

    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = catch
    try:
        cli.main([])
    except Built as built:
        return built.args[0]
    finally:
        argparse.ArgumentParser.parse_args = original
    raise AssertionError("vlpatch.cli.main did not build its parser")


def subcommands() -> dict:
    action = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def shown_commands(text: str):
    """(subcommand, the rest of its line) for each `vlpatch <word>` command shown: in inline code, and on
    the lines of fenced blocks (`$ ` prompts and `VAR=value` prefixes allowed)."""
    for m in re.finditer(r"`(?:[A-Z_]+=\S* )*(?:python -m )?vlpatch ([a-z][\w-]*)([^`]*)`", text):
        yield m.group(1), m.group(2)
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M):
        for line in block.splitlines():
            m = re.match(r"\s*(?:\$ )?(?:[A-Z_]+=\S* )*(?:\S*/)?(?:python -m )?vlpatch ([a-z][\w-]*)(.*)", line)
            if m:
                yield m.group(1), m.group(2).split(" #")[0]


def test_every_command_the_docs_show_exists():
    subs = subcommands()
    for path in ALL_DOCS:
        for name, rest in shown_commands(read(path)):
            assert name in subs, f"{rel(path)} shows `vlpatch {name}`, which the command line does not have"
            options = {o for a in subs[name]._actions for o in a.option_strings}
            for option in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest):
                assert option in options, f"{rel(path)} shows `vlpatch {name} {option}`, which it does not take"


def test_every_subcommand_is_documented():
    text = "".join(read(p) for p in USER_DOCS)
    for name in subcommands():
        assert f"vlpatch {name}" in text, f"`vlpatch {name}` is in the command line but not in README.md or docs/"


def slug(heading: str) -> str:
    """A heading's anchor as GitHub writes it."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path: str) -> set:
    text = re.sub(r"^```.*?^```", "", read(path), flags=re.S | re.M)
    return {slug(h) for h in re.findall(r"^#{1,6} (.+?)\s*$", text, re.M)}


def links(path: str):
    text = re.sub(r"^```.*?^```", "", read(path), flags=re.S | re.M)
    text = re.sub(r"`[^`\n]*`", "", text)
    yield from re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("path", ALL_DOCS, ids=rel)
def test_every_relative_link_points_to_a_file_and_heading(path):
    for target in links(path):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        assert os.path.exists(dest), f"{rel(path)} links to {target}: no such file"
        if anchor and dest.endswith(".md"):
            assert anchor in anchors(dest), f"{rel(path)} links to {target}: {rel(dest)} has no such heading"


def test_the_readme_is_short():
    lines = read(README).count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/ (at most {README_MAX_LINES})"


def test_the_readme_commands_are_what_ci_runs():
    """.ci/run runs the README's two commands, exactly (a fresh clone's CI is what a user would type)."""
    readme = read(README)
    block = next((b for b in re.findall(r"^```bash\n(.*?)^```", readme, re.S | re.M) if "scripts/demo.sh" in b), None)
    assert block is not None, "README.md has no ```bash block with the two commands"
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    ci = [line.strip() for line in read(os.path.join(ROOT, ".ci", "run")).splitlines() if re.match(r"\s*bash scripts/", line)]
    assert ci == commands


def test_the_report_page_names_every_action_and_reason_code():
    text = read(os.path.join(ROOT, "docs", "report.md"))
    for action in [*report.ACTIONS, "error"]:
        if action != "kept":
            assert f"`{action}`" in text, f"docs/report.md does not explain the action {action}"
    codes = re.findall(r"^\| `([a-z_]+)` \|", text.split("### Reason codes", 1)[1].split("\n### ", 1)[0], re.M)
    assert codes, "docs/report.md has no reason-code table"
    assert set(codes) == set(core.REASON_CODES), "docs/report.md's reason codes are not vlpatch.core.REASON_CODES"
    source = "".join(read(p) for p in glob.glob(os.path.join(ROOT, "vlpatch", "**", "*.py"), recursive=True))
    for code in codes:
        assert re.search(rf"\b{code}\b", source), f"docs/report.md documents {code}, which vlpatch never writes"
    # the reasons are written by the core and the integrations as "code: details" (text_over_budget alone)
    writers = "".join(read(p) for p in [os.path.join(ROOT, "vlpatch", "core.py"),
                                        *glob.glob(os.path.join(ROOT, "vlpatch", "integrations", "*.py"))])
    written = set(re.findall(r"[\"'`]([a-z]+(?:_[a-z]+)+): ", writers)) | {"text_over_budget"}
    assert written - set(codes) == set(), f"docs/report.md does not document the reasons {sorted(written - set(codes))}"


def test_a_cut_rows_rule_has_its_heading():
    """The tests and the code cite "what a cut row keeps": docs/policies.md has that heading."""
    assert "what-a-cut-row-keeps" in anchors(os.path.join(ROOT, "docs", "policies.md"))


def test_every_subcommand_the_readme_shows_is_run_by_a_test():
    """Each `vlpatch <subcommand>` of the README runs in a test (its own name as an argument there)."""
    tests = "".join(read(p) for p in glob.glob(os.path.join(ROOT, "tests", "test_*.py")) if not p.endswith("test_docs.py"))
    for name, _ in shown_commands(read(README)):
        assert f'"{name}"' in tests, f"the README shows `vlpatch {name}`, which no test runs"


def test_the_wheel_the_readme_installs_works(tmp_path):
    """README, Install: a wheel built from the clone holds the start-up line, the matrix and its lock, and
    installed into a new environment it runs `vlpatch status`."""
    import shutil
    import subprocess
    import zipfile

    uv = shutil.which("uv") or os.path.join(ROOT, ".venv-tools", "bin", "uv")
    if not os.path.exists(uv):
        pytest.skip("no uv (scripts/setup.sh --tools makes .venv-tools with it)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLPATCH")}
    subprocess.run([uv, "build", "--wheel", "--out-dir", str(tmp_path / "dist"), ROOT], check=True, env=env,
                   capture_output=True, timeout=300)
    [wheel] = glob.glob(str(tmp_path / "dist" / "vlpatch-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for inside in ("vlpatch_autoenable.pth", "vlpatch/compat_matrix.yaml", "vlpatch/compat_lock.json", "vlpatch/cli.py"):
        assert inside in names, f"the wheel lacks {inside}"
    subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(tmp_path / "env")], check=True, env=env, timeout=300)
    python = str(tmp_path / "env" / "bin" / "python")
    subprocess.run([uv, "pip", "install", "-q", "--python", python, wheel], check=True, env=env, capture_output=True, timeout=300)
    out = subprocess.run([str(tmp_path / "env" / "bin" / "vlpatch"), "status"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "llamafactory.truncation" in out.stdout, out.stdout + out.stderr
