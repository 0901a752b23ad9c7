"""Memory and speed against dataset size: packing, a 2-trial search and a final_train on synthetic 244-px tiles.

    python bench/data_scale.py [--sizes 1,4,16,32] [--work DIR] [--steps 8] [--commands pack,search,...] [--json FILE]

For each size (GB of float32 tiles, 14 bands, 244 x 244 px; val 48 and test 16 tiles, the rest train) it writes the
dataset under ``--work`` (a pool of random tiles, each written with its own offset, with GEDI-like tracks of labels),
then measures, each command in its own process, as a user runs it:

- **pack**: ``DataSource(...).open()`` into an empty store folder: wall time, peak RssAnon;
- **search**: ``python -m tune_agb.search`` with 2 trials at once (1 CPU each), ``steps_per_epoch`` bounded so the run
  takes minutes at every size: peak RssAnon of the driver and of every Ray worker process (sampled from
  ``/proc/PID/status`` every 0.2 s), and the peak of Ray's object store (``ray memory --stats-only``, every 2 s);
- **final_train**: the same bounded epochs: peak RssAnon;
- **tiles/s**: the training step fed streamed from the store and resident (the split copied to RAM first; skipped when
  that copy would not fit in half the machine's memory), same model, same batch, side by side in one process.

Datasets are deleted after their size is measured (``--keep`` keeps them). Peak anonymous memory is what grows
with data held privately; the store's pages are file-backed and shared (page cache), so they are not in it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
C, T = 14, 244
TILE_BYTES = C * T * T * 4
VAL, TEST = 48, 16


COMMANDS = ("pack", "search", "final_train", "throughput")


def write_dataset(root: Path, gb: float, seed: int = 0) -> int:
    """Synthetic tiles in the tune_agb layout; returns the number of train tiles."""
    n = max(VAL + TEST + 16, round(gb * 1e9 / TILE_BYTES))
    rng = np.random.default_rng(seed)
    pool = rng.uniform(0, 3000, size=(16, C, T, T)).astype(np.float32)
    splits = ["val"] * VAL + ["test"] * TEST + ["train"] * (n - VAL - TEST)
    for s in ("train", "val", "test"):
        for kind in ("inputs", "labels"):
            (root / kind / s).mkdir(parents=True, exist_ok=True)
    rows = np.arange(T)
    for i, s in enumerate(splits):
        img = pool[i % len(pool)] + np.float32(i % 997)
        lab = np.full((T, T), np.nan, dtype=np.float32)
        r = rows[(rows * 7 + i) % 61 == 0]  # a few short tracks of footprints
        lab[r, (r * 3 + i) % T] = 50.0 + img[7, r, (r * 3 + i) % T] / 60.0
        np.save(root / "inputs" / s / f"t{i:06d}.npy", img)
        np.save(root / "labels" / s / f"t{i:06d}.npy", lab)
    return n - VAL - TEST


def rss_anon(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Monitor:
    """Peak RssAnon of a process and its descendants (by name), and of Ray's object store, sampled."""

    def __init__(self, root_pid: int, ray: bool = False):
        self.root, self.ray = root_pid, ray
        self.peak: dict[int, tuple[str, int]] = {}
        self.store_peak = 0
        self.store_samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _procs(self) -> list[int]:
        pids = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                line = cmdline(int(d.name))
                if int(d.name) == self.root or (self.ray and line.startswith("ray::")):
                    pids.append(int(d.name))
        return pids

    def _run(self) -> None:
        last_store = 0.0
        while not self._stop.is_set():
            for pid in self._procs():
                v = rss_anon(pid)
                if v is not None:
                    name = cmdline(pid).split(" ")[0] if pid != self.root else "driver"
                    self.peak[pid] = (name, max(v, self.peak.get(pid, ("", 0))[1]))
            if self.ray and time.monotonic() - last_store > 2:
                last_store = time.monotonic()
                used = plasma_bytes()
                if used is not None:
                    self.store_samples += 1
                    self.store_peak = max(self.store_peak, used)
            time.sleep(0.2)

    def __enter__(self) -> Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def plasma_bytes() -> int | None:
    """Bytes in the object store of the Ray instance on this node (``ray memory --stats-only``), None if none."""
    try:
        out = subprocess.run(
            ["ray", "memory", "--stats-only", "--address", "auto"], capture_output=True, text=True, timeout=20
        ).stdout
    except (subprocess.TimeoutExpired, OSError):
        return None
    m = re.search(r"Plasma memory usage ([\d.]+) (KiB|MiB|GiB|B)", out)
    if not m:
        return None
    return int(float(m.group(1)) * {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}[m.group(2)])


def run_monitored(cmd: list[str], env: dict[str, str], ray: bool = False, log: Path | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    with open(log or os.devnull, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        with Monitor(proc.pid, ray=ray) as mon:
            code = proc.wait()
    if code != 0:
        raise SystemExit(f"{' '.join(cmd[:4])}: exit {code} (log: {log})")
    workers = sorted((v for pid, v in mon.peak.items() if pid != proc.pid), key=lambda v: -v[1])
    return {
        "wall_s": time.perf_counter() - t0,
        "driver_rss_anon": mon.peak.get(proc.pid, ("", 0))[1],
        "workers_rss_anon": [v[1] for v in workers],
        "store_peak_bytes": mon.store_peak if ray else None,
        "store_samples": mon.store_samples,
    }


PACK = """
import sys, time
from tune_agb.store import DataSource
t = time.perf_counter()
DataSource(sys.argv[1], sys.argv[2]).open()
print(time.perf_counter() - t)
"""


def tiles_per_s(input_dir: Path, label_dir: Path, steps: int, threads: int) -> dict[str, float | None]:
    sys.path.insert(0, str(REPO / "bench"))
    from train_throughput import time_ours

    from tune_agb.engine.config import TrainConfig
    from tune_agb.engine.model import UNet
    from tune_agb.store import DataSource

    torch.set_num_threads(threads)
    packed = DataSource(str(input_dir), str(label_dir), splits=("train",)).open()
    tiles = packed.tiles["train"]
    cfg = TrainConfig(base_channels=16, depth=3, batch_size=8, amp="none")
    torch.manual_seed(0)
    state = UNet.from_config(cfg).state_dict()
    fits = tiles.inputs.nbytes + tiles.labels.nbytes < 0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    out: dict[str, float | None] = {"stream": None, "resident": None}
    for mode in ("stream", "resident", "stream", "resident"):  # twice each, interleaved: the best of two
        if mode == "resident" and not fits:
            continue
        v = time_ours(cfg.replace(data_mode=mode), packed.norm(), tiles, torch.device("cpu"), state, steps, 2)
        out[mode] = max(out[mode] or 0.0, v)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1,4,16,32", help="dataset sizes, GB of float32 tiles")
    p.add_argument("--work", default="/work/scale_bench", help="folder for datasets, stores and runs")
    p.add_argument("--steps", type=int, default=8, help="steps_per_epoch of the search and final_train")
    p.add_argument("--throughput-steps", type=int, default=6)
    p.add_argument("--keep", action="store_true", help="keep the datasets")
    p.add_argument("--commands", default=",".join(COMMANDS), help=f"which to measure, of {','.join(COMMANDS)}")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args()
    todo = [c.strip() for c in a.commands.split(",") if c.strip()]
    if not todo or any(c not in COMMANDS for c in todo):
        raise SystemExit(f"--commands: a comma-separated choice of {', '.join(COMMANDS)}; got {a.commands!r}")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    space = {
        "experiment": {"metric": "val_rmse", "mode": "min", "num_samples": 2, "max_concurrent": 2},
        "scheduler": {"type": "fifo", "max_t": 2},
        "searcher": {"type": "random", "seed": 0},
        "resources": {"cpu": 1, "gpu": 0},
        "fixed": {"depth": 3, "batch_size": 4, "steps_per_epoch": a.steps, "schedule": "cosine"},
        "params": {"lr": {"type": "float", "low": 1e-3, "high": 3e-3, "log": True}, "base_channels": {
            "type": "categorical", "choices": [8]}},
    }  # fmt: skip
    (work / "space.yaml").write_text(yaml.safe_dump(space, sort_keys=False))
    final_cfg = {"depth": 3, "base_channels": 8, "batch_size": 4, "epochs": 2, "steps_per_epoch": a.steps}
    (work / "final.yaml").write_text(yaml.safe_dump(final_cfg))
    results = []
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    print(f"{platform.node()}: {os.cpu_count()} CPUs, {ram:.1f} GB RAM, torch {torch.__version__}", flush=True)
    for gb in (float(s) for s in a.sizes.split(",")):
        ds = work / f"ds_{gb:g}gb"
        shutil.rmtree(ds, ignore_errors=True)
        t0 = time.perf_counter()
        n_train = write_dataset(ds, gb)
        gen_s = time.perf_counter() - t0
        store = work / f"store_{gb:g}gb"
        shutil.rmtree(store, ignore_errors=True)
        env = {**os.environ, "TUNE_AGB_STORE": str(store), "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
        idir, ldir = str(ds / "inputs"), str(ds / "labels")
        row: dict[str, Any] = {"gb": gb, "train_tiles": n_train, "generate_s": gen_s}
        mb = 1024**2
        said = [f"{gb:g} GB ({n_train} train tiles)"]
        if "pack" in todo:
            row["pack"] = run_monitored([sys.executable, "-c", PACK, idir, ldir], env, log=work / f"pack_{gb:g}.log")
            row["store_bytes"] = sum(f.stat().st_size for f in store.rglob("*.npy"))
            said.append(f"pack {row['pack']['wall_s']:.0f} s (RssAnon {row['pack']['driver_rss_anon'] / mb:.0f} MB), "
                        f"store {row['store_bytes'] / 1e9:.2f} GB")  # fmt: skip
        if "search" in todo:
            search = [sys.executable, "-m", "tune_agb.search", "--space", str(work / "space.yaml"),
                      "--input-dir", idir, "--label-dir", ldir, "--storage", str(work / "runs"),
                      "--name", f"scale_{gb:g}gb"]  # fmt: skip
            shutil.rmtree(work / "runs" / f"scale_{gb:g}gb", ignore_errors=True)
            s = row["search"] = run_monitored(search, env, ray=True, log=work / f"search_{gb:g}.log")
            said.append(f"search {s['wall_s']:.0f} s, driver {s['driver_rss_anon'] / mb:.0f} MB, workers "
                        f"{[round(w / mb) for w in s['workers_rss_anon'][:4]]} MB, object store peak "
                        f"{s['store_peak_bytes'] / mb:.1f} MB ({s['store_samples']} samples)")  # fmt: skip
        if "final_train" in todo:
            final = [sys.executable, "-m", "tune_agb.final_train", "--input-dir", idir, "--label-dir", ldir,
                     "--out-dir", str(work / "final" / f"{gb:g}gb"), "--overwrite", "--config",
                     str(work / "final.yaml"), "--no-progress"]  # fmt: skip
            f = row["final_train"] = run_monitored(final, env, log=work / f"final_{gb:g}.log")
            said.append(f"final_train {f['wall_s']:.0f} s, {f['driver_rss_anon'] / mb:.0f} MB")
        if "throughput" in todo:
            os.environ["TUNE_AGB_STORE"] = str(store)
            tps = row["tiles_per_s"] = tiles_per_s(ds / "inputs", ds / "labels", a.throughput_steps, threads=2)
            said.append(f"tiles/s streamed {tps['stream']:.2f}, resident "
                        f"{tps['resident'] if tps['resident'] is None else round(tps['resident'], 2)}")  # fmt: skip
        results.append(row)
        print("; ".join(said), flush=True)
        if not a.keep:
            shutil.rmtree(ds, ignore_errors=True)
            shutil.rmtree(store, ignore_errors=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
