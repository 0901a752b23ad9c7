"""Scenes and blocks of a multi-scene map: which images make each scene, how a scene is cut into blocks on the
model's window grid, and the staging folder that holds the finished blocks of a map still being made.

A block is a rectangle of whole windows of :func:`tune_agb.predict.window_plan` (the windows of one scene, with
the seam-free overlap): it keeps exactly the pixels those windows keep, so the blocks of a scene tile it without a
gap or an overlap and predicting them apart gives the map :func:`tune_agb.predict.predict_map` writes.

Staging (``OUT/.staging/SCENE/``): ``plan.json`` (what the blocks were made with) and one small GeoTIFF per finished
block (``blocks/rRRRR_cCCCC.tif``, written under a temporary name and renamed when complete). A rerun keeps the
blocks of a scene whose plan is unchanged and predicts only the missing ones.
"""

from __future__ import annotations

import glob
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rasterio.windows import Window

from tune_agb.errors import TuneAgbError
from tune_agb.predict import window_plan

STAGING_DIR = ".staging"
PLAN_FILE = "plan.json"
BLOCKS_DIR = "blocks"
PARTIAL = ".partial"
PLAN_FORMAT = 1
_GLOB_CHARS = "*?["

WindowSpan = tuple[int, int, int, int]  # (start, stop, keep_start, keep_stop) along one axis


@dataclass(frozen=True)
class Scene:
    """One scene of a map: the images stacked band-wise (like ``--image``), named after the first one."""

    name: str
    images: tuple[str, ...]


def parse_scenes(specs: Sequence[str]) -> list[Scene]:
    """The scenes that ``--scenes`` values name, in order.

    Each value is a glob (``tiles/*.tif``: every match is one scene), a text file ending in ``.txt`` (one scene per
    line; blank lines and ``#`` comments skipped), or one scene given directly. Within a scene (a line of the file,
    or a value), images separated by commas are stacked band-wise, like a repeated ``--image``. A scene is named
    after the stem of its first image.

    Raises:
        TuneAgbError: a glob matching nothing, an unreadable list file, no scene at all, or two scenes of one name.
    """
    scenes: list[Scene] = []
    for spec in specs:
        if spec.endswith(".txt"):
            path = Path(spec)
            if not path.is_file():
                raise TuneAgbError(f"--scenes {spec}: scene list file not found")
            for line in path.read_text().splitlines():
                line = line.split("#", 1)[0].strip()
                if line:
                    scenes.append(_scene(line, path.parent))
        elif "://" not in spec and any(ch in spec for ch in _GLOB_CHARS):
            matches = sorted(glob.glob(spec))
            if not matches:
                raise TuneAgbError(f"--scenes {spec}: the pattern matches no file")
            scenes += [_scene(m, None) for m in matches]
        else:
            scenes.append(_scene(spec, None))
    if not scenes:
        raise TuneAgbError("--scenes: no scene given")
    seen: dict[str, Scene] = {}
    for s in scenes:
        if s.name in seen:
            raise TuneAgbError(
                f"--scenes: two scenes are named {s.name} ({seen[s.name].images[0]} and {s.images[0]}); "
                "each scene's output is named after its first image: rename one"
            )
        seen[s.name] = s
    return scenes


def _scene(text: str, base: Path | None) -> Scene:
    images = [p.strip() for p in text.split(",") if p.strip()]
    if base is not None:  # relative paths in a list file are relative to the file
        images = [p if "://" in p or Path(p).is_absolute() else str(base / p) for p in images]
    first = images[0].rstrip("/").rsplit("/", 1)[-1]
    return Scene(first.rsplit(".", 1)[0] if "." in first else first, tuple(images))


@dataclass(frozen=True)
class Block:
    """Whole windows of a scene (consecutive rows x consecutive columns of its window plan) and the pixels they keep."""

    row: int
    col: int
    rows: tuple[WindowSpan, ...]
    cols: tuple[WindowSpan, ...]

    @property
    def name(self) -> str:
        return f"r{self.row:04d}_c{self.col:04d}"

    @property
    def window(self) -> Window:
        """The pixels of the scene this block keeps."""
        r0, c0 = self.rows[0][2], self.cols[0][2]
        return Window(c0, r0, self.cols[-1][3] - c0, self.rows[-1][3] - r0)

    @property
    def windows(self) -> int:
        return len(self.rows) * len(self.cols)


def block_plan(height: int, width: int, tile: int, overlap: int, block_size: int) -> list[Block]:
    """A scene's blocks: its windows (side ``tile``, ``overlap`` px shared) grouped ``block_size // stride`` per side
    (at least one), row-major."""
    per = max(1, block_size // (tile - overlap))
    rows, cols = window_plan(height, tile, overlap), window_plan(width, tile, overlap)
    out = []
    for i in range(0, len(rows), per):
        for j in range(0, len(cols), per):
            out.append(Block(i // per, j // per, tuple(rows[i : i + per]), tuple(cols[j : j + per])))
    return out


class Staging:
    """The staging folder of one scene: its plan and its finished blocks."""

    def __init__(self, out_dir: Path, scene: str):
        self.root = out_dir / STAGING_DIR / scene
        self.blocks = self.root / BLOCKS_DIR

    def block_path(self, block: Block) -> Path:
        return self.blocks / f"{block.name}.tif"

    def prepare(self, plan: dict[str, Any]) -> bool:
        """Make the folder for ``plan``; finished blocks of another plan (other model, tiles, images ...) and partial
        files are removed. Returns whether blocks of this plan were kept."""
        path = self.root / PLAN_FILE
        old = None
        if path.is_file():
            try:
                old = json.loads(path.read_text())
            except ValueError:
                old = None
        kept = old == plan
        if not kept and self.root.exists():
            shutil.rmtree(self.root)
        self.blocks.mkdir(parents=True, exist_ok=True)
        for leftover in self.blocks.glob(f"*{PARTIAL}"):  # a process killed mid-write
            leftover.unlink()
        if not kept:
            tmp = path.with_name(PLAN_FILE + PARTIAL)
            tmp.write_text(json.dumps(plan, indent=1, sort_keys=True))
            tmp.replace(path)
        return kept

    def finished(self, blocks: Sequence[Block]) -> set[str]:
        """Names of the blocks already staged."""
        return {b.name for b in blocks if self.block_path(b).is_file()}

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        parent = self.root.parent
        if parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
