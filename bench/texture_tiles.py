"""A copy of a dataset with each band's local standard deviation appended as input channels (the texture forest's
features, :class:`tune_agb.texture.Texture`), so that the U-Net recipe can be screened on them with no engine option.

    python bench/texture_tiles.py --data ../shared/data/gedi-s1s2-real --windows 3,7,15 --out DIR

Writes ``DIR/inputs/{split}/NAME.npy`` with C x (1 + len(windows)) channels (the bands first, then their standard
deviation window by window, each tile on its own, reflect-padded at its edges) and links
``DIR/labels/{split}/NAME.npy`` to the source labels. The forest computes the same features after normalising the
bands, so each texture channel here differs from its feature by the band's scale, which the U-Net's per-channel
normalisation takes out. Train on the copy with ``fixed.in_channels`` set to the new channel count (it prints it).
A rerun overwrites the inputs and keeps the links.

Used in bench/RESULTS.md ("Two regions, seventh run") with ``region_transfer.py --a/--b`` on the copies: the U-Net
given the texture forest's inputs on all 47 tiles.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

from tune_agb.bands import SPLITS
from tune_agb.texture import Texture, parse_windows


def texture_copy(data: Path, windows: tuple[int, ...], out: Path) -> int:
    """Write the copy of ``data`` under ``out``; returns its channel count.

    Raises:
        SystemExit: ``data`` has no tile in any split, or a tile is not (C, H, W) with the first tile's C.
    """
    texture = Texture(windows)
    bands = None
    for split in SPLITS:
        for f in sorted((data / "inputs" / split).glob("*.npy")):
            x = np.load(f)
            if x.ndim != 3 or x.shape[0] != (bands or x.shape[0]):
                raise SystemExit(f"{f}: shape {x.shape}; expected (C, H, W) with the first tile's C")
            bands = x.shape[0]
            with torch.no_grad():
                y = texture(torch.from_numpy(np.ascontiguousarray(x, np.float32))[None])[0].numpy()
            (out / "inputs" / split).mkdir(parents=True, exist_ok=True)
            np.save(out / "inputs" / split / f.name, y)
            label = data / "labels" / split / f.name
            link = out / "labels" / split / f.name
            link.parent.mkdir(parents=True, exist_ok=True)
            if label.exists() and not link.exists():
                os.symlink(label.resolve(), link)
    if bands is None:
        raise SystemExit(f"{data}: no tile under inputs/{{{','.join(SPLITS)}}}/")
    return bands * (1 + len(windows))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="dataset folder with inputs/ and labels/")
    p.add_argument("--windows", default="3,7,15", help="odd window sizes in px (the texture forest's: 3,7,15)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    channels = texture_copy(Path(a.data), parse_windows(a.windows, "--windows"), Path(a.out))
    print(f"{a.out}: {channels} channels (set fixed.in_channels={channels})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
