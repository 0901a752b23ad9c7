"""constraints.txt: the exact versions the suite last passed with, and what changed since.

    python .ci/deps.py freeze            pin every distribution that tune_agb and its extras pull into this environment
    python .ci/deps.py diff              installed versions that differ from constraints.txt
    python .ci/deps.py blame --cache-dir DIR | NODEID...
                                         rerun the failing tests (pytest's last failures in DIR, or the node ids)
                                         with each package newer than constraints.txt put back alone to its pinned
                                         version; a package whose pinned version makes them pass is named as the break

``bash .ci/newest`` runs the suite in a fresh venv on the newest releases and calls ``diff``, then ``blame`` when the
suite fails (or ``freeze`` with ``--freeze`` when it passes). Runs with the interpreter of the environment it looks at;
needs ``packaging`` (installed with pytest).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO / "constraints.txt"
# Installed but never pinned: the installer itself. (setuptools is pinned: tensorboard needs it at run time.)
UNPINNED = {"pip"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def public(version: str) -> str:
    """The version without its local label: torch 2.13.0+cpu is pinned as 2.13.0, which a CUDA build matches too."""
    return str(Version(version).public)


def project() -> tuple[str, list[str]]:
    """The project's name and its requirements: dependencies and every extra (the test extra holds them all)."""
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(meta["dependencies"])
    for extra in meta.get("optional-dependencies", {}).values():
        reqs += extra
    return norm(meta["name"]), reqs


def installed() -> dict[str, importlib.metadata.Distribution]:
    dists: dict[str, importlib.metadata.Distribution] = {}
    for d in importlib.metadata.distributions():
        dists.setdefault(norm(d.metadata["Name"]), d)  # the first on sys.path is the one imported
    return dists


def closure(roots: list[str], dists: dict[str, importlib.metadata.Distribution]) -> dict[str, str]:
    """``{name: installed version}`` for the roots and everything they require here (markers evaluated)."""
    todo = [Requirement(r) for r in roots]
    seen: dict[str, set[str]] = {}
    missing = []
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name, extras = norm(req.name), set(req.extras)
        if name in seen and extras <= seen[name]:
            continue
        seen.setdefault(name, set()).update(extras)
        dist = dists.get(name)
        if dist is None:
            missing.append(req.name)
            continue
        for line in dist.requires or []:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras | {""}):
                sub.marker = None
                todo.append(sub)
    if missing:
        raise SystemExit(f"required but not installed: {', '.join(sorted(set(missing)))}")
    return {name: dists[name].version for name in seen}


def wanted() -> dict[str, str]:
    """What the project pulls into this environment, without itself and the installer."""
    name, reqs = project()
    got = closure(reqs, installed())
    return {k: v for k, v in sorted(got.items()) if k != name and k not in UNPINNED}


def read_constraints(path: Path = CONSTRAINTS) -> dict[str, str]:
    """``{name: pinned version}`` from a constraints file of ``name==version [; marker]`` lines."""
    pins = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        if len(specs) != 1 or specs[0].operator != "==":
            raise ValueError(f"{path.name}: {raw!r} is not an exact pin (name==version)")
        pins[norm(req.name)] = specs[0].version
    return pins


def render(pins: dict[str, str]) -> str:
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    head = [
        "# The exact versions the full suite last passed with; the README's test command (and so .ci/run) installs",
        "# with -c constraints.txt, so a fresh clone gets these rather than whatever was released since.",
        f"# Written by `bash .ci/newest --freeze` (python .ci/deps.py freeze) on Python {platform.python_version()},",
        f"# {platform.system()} {platform.machine()}: every distribution tune_agb and its extras pull in, pip",
        f"# excepted. The marker leaves Python < {py} (whose wheels these may lack) on the newest releases.",
    ]
    return "\n".join([*head, *(f'{k}=={public(v)} ; python_version >= "{py}"' for k, v in pins.items())]) + "\n"


@dataclass
class Change:
    name: str
    pinned: str | None  # None: a new dependency, not in constraints.txt
    now: str | None  # None: pinned but no longer pulled in

    def __str__(self) -> str:
        if self.pinned is None:
            return f"{self.name} {self.now} (new: not in constraints.txt)"
        if self.now is None:
            return f"{self.name} (pinned {self.pinned}, no longer installed)"
        return f"{self.name} {self.pinned} -> {self.now}"


def changes(pins: dict[str, str], now: dict[str, str]) -> list[Change]:
    out = []
    for name in sorted(pins.keys() | now.keys()):
        a, b = pins.get(name), now.get(name)
        if a is None or b is None or Version(public(b)) != Version(a):
            out.append(Change(name, a, None if b is None else public(b)))
    return out


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *args], check=True)


def passes(nodeids: list[str]) -> bool:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", *nodeids]
    return subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


def blame(nodeids: list[str]) -> list[Change]:
    """The changed packages whose pinned version, put back alone (``--no-deps``), makes the failing tests pass."""
    changed = [c for c in changes(read_constraints(), wanted()) if c.pinned and c.now]
    if not changed:
        print("blame: every package is at its constraints.txt version: the failure is not a new release")
        return []
    print(f"blame: {len(nodeids)} failing test(s), {len(changed)} package(s) newer than constraints.txt")
    if passes(nodeids):
        print("blame: the failing tests pass on a rerun with the same versions: flaky, not a new release")
        return []
    culprits = []
    for c in changed:
        t0 = time.monotonic()
        pip(f"{c.name}=={c.pinned}")
        try:
            ok = passes(nodeids)
        finally:
            pip(f"{c.name}=={c.now}")
        print(f"blame:   {c}: {'PASS with ' + c.pinned if ok else 'still fails'} ({time.monotonic() - t0:.0f} s)")
        if ok:
            culprits.append(c)
    if culprits:
        for c in culprits:
            print(f"BROKEN BY {c.name} {c.now}: the failing tests pass with {c.name}=={c.pinned} (constraints.txt)")
        return culprits
    pip(*(f"{c.name}=={c.pinned}" for c in changed))
    if passes(nodeids):
        print("blame: no single package: the failing tests pass only with all of these at their pinned versions:")
        print("\n".join(f"  {c}" for c in changed))
    else:
        print("blame: the failing tests fail with the pinned versions too: not a new release of a pinned package")
    return []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("freeze", help="rewrite constraints.txt from this environment")
    sub.add_parser("diff", help="list the packages whose installed version differs from constraints.txt")
    b = sub.add_parser("blame", help="name the package whose new release breaks the given failing tests")
    b.add_argument("--cache-dir", type=Path, help="pytest's cache_dir: blame its last failures")
    b.add_argument("nodeids", nargs="*")
    args = ap.parse_args(argv)
    if args.cmd == "freeze":
        pins = wanted()
        CONSTRAINTS.write_text(render(pins))
        print(f"wrote {CONSTRAINTS.name}: {len(pins)} pins")
    elif args.cmd == "diff":
        diff = changes(read_constraints(), wanted())
        print(f"{len(diff)} package(s) differ from constraints.txt" + (":" if diff else ""))
        print("\n".join(f"  {c}" for c in diff))
    else:
        nodeids = list(args.nodeids)
        lastfailed = args.cache_dir / "v" / "cache" / "lastfailed" if args.cache_dir else None
        if lastfailed is not None and lastfailed.is_file():
            nodeids += sorted(json.loads(lastfailed.read_text()))
        if not nodeids:
            ap.error("no failing tests to blame (give node ids, or --cache-dir of a run that failed)")
        return 0 if blame(nodeids) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
