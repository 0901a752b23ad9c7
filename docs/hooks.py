"""MkDocs hook: the command-flag reference is each command's own ``--help``, run at build time, so it cannot drift.

A page line ``<!-- help: tune_agb.MODULE -->`` becomes the output of ``python -m tune_agb.MODULE --help`` in a code
block. ``tests/test_docs.py`` uses :func:`command_help` and :func:`help_flags` to check every flag the docs name.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Every command a user runs with `python -m` (tune_agb.search is a package whose __main__ is search/cli.py).
COMMANDS = (
    "tune_agb.search",
    "tune_agb.final_train",
    "tune_agb.report",
    "tune_agb.baseline",
    "tune_agb.prepare",
    "tune_agb.predict",
    "tune_agb.demo",
)
PLACEHOLDER = re.compile(r"^<!-- help: (tune_agb[\w.]*) -->$", re.MULTILINE)


@cache
def command_help(module: str) -> str:
    """``python -m MODULE --help`` as the command prints it (80 columns, the repository on PYTHONPATH).

    Raises:
        RuntimeError: the command does not exist or its ``--help`` fails.
    """
    env = {**os.environ, "COLUMNS": "100", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, env=env, cwd=REPO, timeout=300
    )
    if run.returncode != 0:
        raise RuntimeError(f"python -m {module} --help failed ({run.returncode}): {run.stderr.strip()[-500:]}")
    return run.stdout.replace(str(REPO), ".")


def all_help() -> dict[str, str]:
    """Every command's ``--help``, run side by side (each start imports torch or Ray)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(COMMANDS, pool.map(command_help, COMMANDS), strict=True))


def help_flags(text: str) -> set[str]:
    """The long flags (``--name``) a ``--help`` text offers, including ``--no-`` forms argparse prints."""
    return set(re.findall(r"(?<![\w-])(--[a-zA-Z][\w-]*)", text))


def on_pre_build(config: object) -> None:
    all_help()  # warm the cache in parallel


def on_page_markdown(markdown: str, page: object, config: object, files: object) -> str:
    def block(match: re.Match[str]) -> str:
        return f"```text\n$ python -m {match.group(1)} --help\n{command_help(match.group(1)).rstrip()}\n```"

    return PLACEHOLDER.sub(block, markdown)
