"""Does storing the inputs as float16 change what final_train learns? float16 vs float32 stores, same seeds.

    python bench/store_dtype.py [--data demo,real] [--seeds 0,1,2] [--epochs-demo 12] [--epochs-real 20]

For each dataset (the demo data; the 17 real tiles of ``../shared/data/gedi-s1s2-real``) and each storage dtype,
``python -m tune_agb.final_train`` with the default config (epochs as given) runs once per seed in its own process,
with its own store folder (``TUNE_AGB_STORE``) and ``TUNE_AGB_STORE_DTYPE``. Prints val/test RMSE and R² per run,
their mean ± sd over seeds per dtype, and the paired float16 - float32 differences against the seed-to-seed sd.

Training is chaotic: a rounding difference in the inputs changes the whole trajectory, so the paired runs differ
by seed noise. ``--same-model`` isolates the rounding itself: one model (trained on the float32 store) predicts
val and test from the float32 store and from the float16 store, and the metrics are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "data" / "gedi-s1s2-real"


def run(data: Path | None, dtype: str, seed: int, epochs: int, work: Path) -> dict[str, float]:
    out = work / f"{data.name if data else 'demo'}_{dtype}_{seed}"
    env = {**os.environ, "TUNE_AGB_STORE": str(work / f"store_{dtype}"), "TUNE_AGB_STORE_DTYPE": dtype}
    cmd = [sys.executable, "-m", "tune_agb.final_train", "--out-dir", str(out), "--seed", str(seed), "--epochs",
           str(epochs), "--no-progress"]  # fmt: skip
    if data is not None:
        cmd += ["--input-dir", str(data / "inputs"), "--label-dir", str(data / "labels")]
    subprocess.run(cmd, env=env, check=True, capture_output=True, cwd=REPO)
    m = json.loads((out / "metrics.json").read_text())
    return {k: m[k] for k in ("val_rmse", "val_r2", "test_rmse", "test_r2")}


def same_model(data: Path | None, epochs: int, work: Path) -> None:
    """One float32-trained model, evaluated on float32 and on float16 inputs: the rounding's own effect."""
    import torch

    from tune_agb.demo_data import data_dirs
    from tune_agb.engine.checkpoint import load_checkpoint
    from tune_agb.engine.data import SplitFeed
    from tune_agb.engine.inference import member_from_state
    from tune_agb.engine.train import evaluate_split
    from tune_agb.store import DataSource

    run(data, "float32", 0, epochs, work)
    out = work / f"{data.name if data else 'demo'}_float32_0"
    state = load_checkpoint(out / "best.pt")
    member = member_from_state(state, torch.device("cpu"))
    norm = member.norm
    idir, ldir = data_dirs(str(data / "inputs") if data else None, str(data / "labels") if data else None, None)
    for split in ("val", "test"):
        got = {}
        for dtype in ("float32", "float16"):
            src = DataSource(str(idir), str(ldir), splits=(split,), dtype=dtype)
            os.environ["TUNE_AGB_STORE"] = str(work / f"store_{dtype}")
            tiles = src.open().tiles[split]
            feed = SplitFeed(tiles, norm, torch.device("cpu"))
            got[dtype] = evaluate_split(member.model, feed, member.config, norm, 8, None, keep=()).metrics
        d = {k: got["float16"][k] - got["float32"][k] for k in ("rmse", "r2", "within_1sigma")}
        print(
            f"  same model, {split}: float32 inputs rmse {got['float32']['rmse']:.5f} r2 {got['float32']['r2']:.5f};"
            f" float16 inputs rmse {got['float16']['rmse']:.5f} r2 {got['float16']['r2']:.5f}; difference "
            + ", ".join(f"{k} {v:+.2e}" for k, v in d.items()),
            flush=True,
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="demo,real")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs-demo", type=int, default=12)
    p.add_argument("--epochs-real", type=int, default=20)
    p.add_argument("--same-model", action="store_true", help="only the same-model comparison (one training run)")
    a = p.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    with tempfile.TemporaryDirectory(prefix="tune_agb_dtype_") as tmp:
        for name in a.data.split(","):
            data = None if name == "demo" else REAL
            epochs = a.epochs_demo if name == "demo" else a.epochs_real
            if a.same_model:
                print(f"\n{name} ({epochs} epochs, default config)")
                same_model(data, epochs, Path(tmp))
                continue
            res = {dt: [run(data, dt, s, epochs, Path(tmp)) for s in seeds] for dt in ("float32", "float16")}
            print(f"\n{name} ({epochs} epochs, default config), seeds {seeds}")
            for dt, rows in res.items():
                for s, r in zip(seeds, rows, strict=True):
                    print(f"  {dt} seed {s}: " + "  ".join(f"{k} {v:.4f}" for k, v in r.items()))
            for k in ("val_rmse", "val_r2", "test_rmse", "test_r2"):
                v32 = [r[k] for r in res["float32"]]
                v16 = [r[k] for r in res["float16"]]
                diff = [b - c for b, c in zip(v16, v32, strict=True)]
                print(
                    f"  {k}: float32 {statistics.mean(v32):.4f} ± {statistics.stdev(v32):.4f}, float16 "
                    f"{statistics.mean(v16):.4f} ± {statistics.stdev(v16):.4f}; paired difference "
                    f"{statistics.mean(diff):+.4f} (max |d| {max(abs(d) for d in diff):.4f})",
                    flush=True,
                )


if __name__ == "__main__":
    main()
