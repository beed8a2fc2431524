"""The documentation's examples run as written.

Every bash and Python block of README.md and the task pages carries a mark on the line before it:
``<!-- test: run -->`` (executed here, on ../shared/data), ``<!-- test: parse (why not run) -->`` (every
``pneumoscan`` line parsed by the real parser, so a documented option that no longer exists fails) or
``<!-- test: skip (why) -->`` (an install line, or a block that needs what the tests lack: a GPU, a cluster, a
PACS). The site itself must build with ``mkdocs build --strict``.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pneumoscan.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
# README and the pages of the site that show commands; results.md, benchmarks.md and experiments.md quote the
# commands that produced their figures, which are re-run by their own scripts, not here
PAGES = ["README.md"] + [f"docs/{name}.md" for name in
                         ("index", "install", "screen", "train", "deploy", "archive", "adapt", "monitor")]
USER_PAGES = ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")
                                    if p.name != "experiments.md")
CODE_LANGS = {"bash", "sh", "shell", "console", "python"}
MARK = re.compile(r"<!-- test: (run|parse|skip)(?: \((.+)\))? -->")
FENCE = re.compile(r"^```(\w*)\s*$")


def blocks(page: str) -> list[tuple[str, int, str, str, str, str]]:
    """(page, line, language, mark, reason, code) of every fenced block in ``page``."""
    lines = (ROOT / page).read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        previous = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        mark = MARK.search(previous)
        found.append((page, i + 1, fence.group(1), mark.group(1) if mark else "", (mark.group(2) or "") if mark
                      else "", "\n".join(lines[i + 1:end])))
        i = end + 1
    return found


CODE_BLOCKS = [b for page in PAGES for b in blocks(page) if b[2] in CODE_LANGS]


def commands(code: str) -> list[list[str]]:
    """The shell commands of a block as argument lists: continuations joined, comments dropped, split at && | ;."""
    joined = re.sub(r"\\\n\s*", " ", code)
    out = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        current: list[str] = []
        for word in words + ["&&"]:
            if word in ("&&", "||", "|", ";"):
                if current:
                    out.append(current)
                current = []
            else:
                current.append(word)
    return out


def pneumoscan_argv(argv: list[str]) -> list[str] | None:
    """The arguments given to pneumoscan by one command, or None when it does not run pneumoscan."""
    if argv[0] == "pneumoscan":
        return argv[1:]
    if "-m" in argv and argv[argv.index("-m") + 1] in ("pneumoscan", "pneumoscan.cli"):
        return argv[argv.index("-m") + 2:]
    return None


def test_every_code_block_is_run_or_says_why_not():
    unmarked = [f"{page}:{line}" for page, line, _, mark, _, _ in CODE_BLOCKS if not mark]
    assert not unmarked, f"code blocks without a <!-- test: run|parse (why)|skip (why) --> mark: {unmarked}"
    unexplained = [f"{page}:{line}" for page, line, _, mark, reason, _ in CODE_BLOCKS
                   if mark != "run" and not reason]
    assert not unexplained, f"parse/skip marks must say why the block is not run: {unexplained}"


@pytest.mark.parametrize("block", [b for b in CODE_BLOCKS if b[2] != "python"], ids=lambda b: f"{b[0]}:{b[1]}")
def test_documented_pneumoscan_commands_parse_with_the_real_parser(block):
    page, line, _, _, _, code = block
    parser = build_parser()
    for argv in commands(code):
        args = pneumoscan_argv(argv)
        if args is None:
            continue
        try:
            parser.parse_args(args)
        except SystemExit as exc:  # argparse's way of refusing an option
            pytest.fail(f"{page}:{line}: `{shlex.join(argv)}` is refused by the parser (exit {exc.code})")


def test_the_parser_check_catches_an_option_that_does_not_exist():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["predict", "x.jpeg", "--no-such-option"])


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    install_and_test = re.search(r'^pip install -e "\.\[dev\]" && (.+)$', readme, flags=re.M)
    assert install_and_test, "README has no `pip install -e \".[dev]\" && <test command>` line"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert install_and_test.group(1) in ci, "README's test command is not a line of .ci/run"
    assert any('-e ".[dev]"' in line and "pip install" in line for line in ci)
    assert any("mkdocs build --strict" in line for line in ci)


def test_readme_first_block_installs_the_cpu_build_first_and_screens():
    first = next(b for b in blocks("README.md") if b[2] in CODE_LANGS)[5].splitlines()
    assert first[0].startswith("pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu")
    assert "without a GPU" in first[0]
    assert first[1].startswith("pip install -e . && pneumoscan predict ")


def test_user_pages_name_no_issue_recipe_or_commit():
    """History (issues, recipe numbers, commits) lives in CHANGELOG.md and docs/experiments.md only."""
    pattern = re.compile(r"\b(?:[Ii]ssues? \d+|[Rr]ecipes? \d+)\b|(?<![0-9a-f])(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)"
                         r"[0-9a-f]{7,10}(?![0-9a-f])")
    found = []
    for page in USER_PAGES:
        for number, text in enumerate((ROOT / page).read_text(encoding="utf-8").splitlines(), 1):
            found += [f"{page}:{number}: {m.group(0)}" for m in pattern.finditer(text)]
    assert not found, found


def _shared_data():
    if not (SHARED_DATA / "chest_xray").is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{SHARED_DATA} is missing: the documentation examples need ../shared/data in CI")
        pytest.skip(f"{SHARED_DATA} not present")


def _runnable(code: str) -> str:
    """The block with ../shared/data made absolute, so it runs from a scratch folder."""
    return code.replace("../shared/data", str(SHARED_DATA))


RUN_BLOCKS = [b for b in CODE_BLOCKS if b[3] == "run"]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("block", RUN_BLOCKS, ids=lambda b: f"{b[0]}:{b[1]}")
def test_documented_example_runs_as_written(block, tmp_path):
    _shared_data()
    page, line, lang, _, _, code = block
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if lang == "python":
        result = subprocess.run([sys.executable, "-c", _runnable(code)], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{page}:{line}:\n{result.stderr[-3000:]}"
        return
    ran = 0
    for argv in commands(_runnable(code)):
        if argv[0] == "pip":  # the tests run in the installed environment
            continue
        args = pneumoscan_argv(argv)
        argv = [sys.executable, "-m", "pneumoscan.cli", *args] if args is not None else argv
        result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{page}:{line}: `{shlex.join(argv)}` exited {result.returncode}:\n" \
                                       f"{result.stderr[-3000:]}"
        ran += 1
    assert ran, f"{page}:{line}: a run block with nothing to run"


@pytest.mark.slow
def test_site_builds_strict(tmp_path):
    """Every page in the nav, every link and anchor target present, every API reference entry found."""
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir",
                             str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8").count("pneumoscan.pipeline.") > 3


def test_readme_links_point_at_files_that_exist():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = {t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", readme) if "://" not in t}
    missing = sorted(t for t in targets if t and not (ROOT / t).exists())
    assert not missing, f"README links to files that do not exist: {missing}"
