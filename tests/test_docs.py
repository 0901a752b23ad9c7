"""The docs cannot drift from the code: every ``python -m tune_agb.X`` command and every ``--flag`` that README.md and
docs/**/*.md name exists (each command's ``--help`` parsed), every internal link and anchor resolves, every figure
exists, and the search page's example commands are accepted by the command as written (``--print-config``)."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
import unicodedata
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import REPO

DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(DOCS.rglob("*.md"))]
# Commands removed in 0.2: a page may name them only on a line that says they were removed.
REMOVED_COMMANDS = {"tune_agb.pretrain"}
# Flags of other tools the docs show (ray start, tensorboard, mkdocs, .ci/newest).
# flags of ray start / ray job, tensorboard, mkdocs and .ci/newest that the docs show
OTHER_TOOLS = {
    "--head",
    "--port",
    "--logdir",
    "--strict",
    "--site-dir",
    "--freeze",
    "--help",
    "--working-dir",
    "--runtime-env-json",
    "--follow",
}


def _hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


hooks = _hooks()


def _rel(page: Path) -> str:
    return str(page.relative_to(REPO))


def _code(text: str) -> list[str]:
    """The page's commands: fenced code blocks (continuation lines joined) and inline code spans."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    lines = [ln for b in blocks for ln in b.replace("\\\n", " ").splitlines()]
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    return lines + re.findall(r"`([^`\n]+)`", prose)


def _invocations(text: str) -> list[tuple[str, list[str]]]:
    """Each ``python -m tune_agb.X ...`` in the page's code with the flags given to it (up to ``&&``, ``|``, ``#``)."""
    found = []
    for line in _code(text):
        for part in re.split(r"&&|\|\||;|\s#", line):
            m = re.search(r"python -m (tune_agb[\w.]*)(.*)", part)
            if m:
                found.append((m.group(1), re.findall(r"(?<![\w-])(--[a-zA-Z][\w-]*)", m.group(2))))
    return found


@pytest.fixture(scope="module")
def helps() -> dict[str, str]:
    return hooks.all_help()


def test_every_command_the_docs_run_exists_with_every_flag_given_to_it(helps: dict[str, str]) -> None:
    bad = []
    for page in PAGES:
        text = page.read_text()
        for module, flags in _invocations(text):
            if module in REMOVED_COMMANDS:
                continue
            if module not in helps:
                bad.append(f"{_rel(page)}: python -m {module} is not a command ({', '.join(helps)})")
                continue
            bad += [
                f"{_rel(page)}: python -m {module} has no {f}"
                for f in flags
                if f not in hooks.help_flags(helps[module])
            ]
    assert not bad, "\n".join(bad)


def test_removed_commands_are_named_only_as_removed() -> None:
    bad = [
        f"{_rel(page)}: {line.strip()[:100]}"
        for page in PAGES
        for line in page.read_text().splitlines()
        if any(cmd in line for cmd in REMOVED_COMMANDS) and "removed" not in line
    ]
    assert not bad, "\n".join(bad)


def test_every_flag_the_docs_name_exists_somewhere(helps: dict[str, str]) -> None:
    """A flag named in prose (``--ensemble-top 3``) belongs to one of the commands, or to a bench script or CI
    script that defines it, or to another tool the docs show."""
    ours = set().union(*(hooks.help_flags(h) for h in helps.values()))
    scripts = "".join(p.read_text() for p in [*REPO.glob("bench/*.py"), *REPO.glob("bench/*.sh"), *REPO.glob(".ci/*")])
    bad = []
    for page in PAGES:
        for line in _code(page.read_text()):
            for flag in re.findall(r"(?<![\w-])(--[a-zA-Z][\w-]*)", line):
                if flag not in ours and flag not in OTHER_TOOLS and f'"{flag}"' not in scripts:
                    bad.append(f"{_rel(page)}: {flag} ({line.strip()[:80]})")
    assert not bad, "\n".join(sorted(set(bad)))


def _slug(heading: str) -> str:
    """MkDocs' (Python-Markdown toc) anchor of a heading."""
    text = re.sub(r"<[^>]+>", "", heading).replace("`", "")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)
    return {_slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE)}


def test_every_internal_link_and_anchor_resolves() -> None:
    bad = []
    for page in PAGES:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                bad.append(f"{_rel(page)}: {target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                bad.append(f"{_rel(page)}: {target}: no heading with that anchor")
    assert not bad, "\n".join(bad)


def test_every_page_is_in_the_site_navigation() -> None:
    nav = (REPO / "mkdocs.yml").read_text()
    missing = [_rel(p) for p in DOCS.rglob("*.md") if str(p.relative_to(DOCS)) not in nav]
    assert not missing


def test_readme_is_short_and_shows_both_commands() -> None:
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) < 200
    assert "python -m tune_agb.search --space search_spaces/demo.yaml" in text and "python -m pytest" in text


@pytest.mark.slow
def test_the_search_pages_example_commands_are_accepted_as_written(tmp_path: Path) -> None:
    """Every search command of the tutorial and the search reference that names a space file of the repository and
    no placeholder folder: the command as written, plus --print-config (checks the space, overrides and flags and
    exits before Ray starts)."""
    pages = [DOCS / "tutorial" / "demo.md", DOCS / "reference" / "search.md", DOCS / "reference" / "search-space.md"]
    commands = [
        line[line.index("python -m tune_agb.search") :]
        for page in pages
        for line in _code(page.read_text())
        if "python -m tune_agb.search" in line and "search_spaces/" in line and not re.search(r"[A-Z]{3,}/", line)
    ]
    assert len(commands) >= 2
    for cmd in commands:
        argv = shlex.split(cmd.split("&&")[0])[2:]
        run = subprocess.run(
            [sys.executable, "-m", *argv, "--print-config"], cwd=REPO, capture_output=True, text=True, timeout=300
        )
        assert run.returncode == 0, f"{cmd}: {run.stderr.strip()[-400:]}"
        assert "experiment:" in run.stdout
