"""The one prepared GPU check: run it on a CUDA host (see ../shared/gpu/README.md for the offline wheels).

    python bench/gpu_check.py --out gpu_check_out [--budget-s 480] [--device cuda|cpu] [--only STEPS]

Steps, each a subprocess with its log under ``--out``, each stopped at its share of the budget, then a short table
(``summary.json`` holds it too):

1. ``nvidia-smi`` and the software versions;
2. ``throughput``: ``bench/train_throughput.py`` for the base-64, depth-4 U-Net at 244 px, side by side with the
   original-style loop, then lever by lever: eager at batch 8, 16 and 32 and ``compile: fused``
   (tune_agb.engine.fused) at batch 16, 8 and 32, with a profile of the eager and fused steps (targets: >= 2x the
   baseline, >= 35 % of the card's bf16 dense peak);
3. ``predict``: ``bench/raster_io.py`` predicts an 8192 x 8192 x 14 GeoTIFF stack with a base-32, depth-4 U-Net on
   the GPU (megapixels per second; needs rasterio);
4. ``tests``: the CUDA-marked tests (``pytest -m cuda``): bf16 autocast, channels_last, resident and streamed data, no
   per-batch host sync (the fused layers too), the fused layers against eager, the memory-fit check, torch.compile,
   a quarter-GPU trial within its cap, an infeasible trial. Meanwhile ``bench/gpu_scale.py store`` writes the
   synthetic store (20,000 + 1,000 tiles of 244 px) that the next steps share;
5. ``quarter`` / ``whole``: the real model (base 32, depth 4, 244 px, batch 16, ``--packing-steps`` batches per
   epoch, streamed from the synthetic store, FIFO, every trial to max_t): four trials at 0.25 GPU at once, and one
   trial on the whole GPU; from their results: aggregate trial-epochs per minute, the most trials at once, and each
   trial's peak device memory against its share (target: >= 2.5x);
6. ``scale``: ``bench/gpu_scale.py search`` on the synthetic store: fractional GPUs, ASHA, a SIGKILL and
   ``--resume``; GPU utilisation over time, host RSS per trial, time per epoch against the compute bound;
7. ``infeasible`` (only when asked for): a search at 0.25 GPU where one configuration cannot fit its share (a
   2-billion-weight U-Net): it must be reported as infeasible while its neighbours finish.

``--device cpu`` rehearses the plumbing on a machine without a GPU (small sizes, no GPU resources).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
STEPS = ("throughput", "predict", "tests", "quarter", "whole", "scale", "infeasible")
DEFAULT_STEPS = STEPS[:-1]


def pick_data_dir(candidates: list[Path], need_gb: float) -> Path | None:
    """The first folder (created if missing) on a filesystem with ``need_gb`` free, else None."""
    for c in candidates:
        try:
            c.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(c).free / 1e9
        except OSError:
            continue
        if free >= need_gb:
            return c
    return None


def run(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> tuple[int, float]:
    start = time.perf_counter()
    with log.open("w") as f:
        try:
            code = subprocess.run(
                cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, timeout=timeout, env=env
            ).returncode
        except subprocess.TimeoutExpired:
            code = 124
    return code, time.perf_counter() - start


def tail(path: Path, n: int = 1) -> str:
    lines = path.read_text(errors="replace").strip().splitlines() if path.is_file() else []
    return " | ".join(lines[-n:]) or "(no output)"


def search_rates(results: Path, share_gb: float | None) -> dict[str, float]:
    """Trial-epochs per minute over the search's reporting span, the peak number of overlapping trials, and the
    largest per-trial peak of device memory (``gpu_mem_peak_gb``) against the share."""
    import pandas as pd

    df = pd.read_parquet(results)
    df = df[df["infeasible"].isna()] if "infeasible" in df else df
    spans = df.groupby("trial_id")["wall_time"].agg(["min", "max"])
    # A trial runs from before its first report (one epoch earlier) to its last report.
    per_epoch = (spans["max"] - spans["min"]) / (df.groupby("trial_id").size() - 1).clip(lower=1)
    starts = spans["min"] - per_epoch
    events = sorted([(t, 1) for t in starts] + [(t, -1) for t in spans["max"]])
    live = peak = 0
    for _, d in events:
        live += d
        peak = max(peak, live)
    minutes = (spans["max"].max() - starts.min()) / 60
    out = {
        "trials": len(spans),
        "trial_epochs": len(df),
        "minutes": minutes,
        "epochs_per_min": len(df) / minutes,
        "peak_parallel": peak,
    }
    if "gpu_mem_peak_gb" in df and df["gpu_mem_peak_gb"].notna().any():
        out["max_trial_peak_gb"] = float(df["gpu_mem_peak_gb"].max())
        out["share_gb"] = share_gb
    return out


class GpuSampler:
    """``nvidia-smi`` every second while a search runs: the most compute processes seen at once and their memory."""

    def __init__(self, log: Path):
        self.log, self.stop, self.most = log, threading.Event(), 0
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        with self.log.open("w") as f:
            while not self.stop.wait(1.0):
                try:
                    out = subprocess.run(
                        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"],
                        capture_output=True,
                        text=True,
                        timeout=10,
                    ).stdout.strip()
                except (OSError, subprocess.SubprocessError) as exc:
                    f.write(f"{time.time():.1f} error {exc}\n")
                    continue
                rows = [r for r in out.splitlines() if r.strip()]
                self.most = max(self.most, len(rows))
                f.write(f"{time.time():.1f} {len(rows)} {'; '.join(rows)}\n")
                f.flush()

    def __enter__(self) -> GpuSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=15)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("gpu_check_out"))
    p.add_argument("--budget-s", type=float, default=480, help="the whole check ends within this many seconds")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: rehearse without a GPU")
    p.add_argument("--only", default=",".join(DEFAULT_STEPS), help=f"comma-separated steps among {', '.join(STEPS)}")
    p.add_argument("--throughput-args", default="", help="replace the throughput step's size and lever arguments")
    p.add_argument("--throughput-s", type=float, default=85, help="the throughput step's cap (seconds)")
    p.add_argument("--tests-s", type=float, default=100, help="the CUDA tests' cap (seconds)")
    p.add_argument("--predict-args", default="", help="replace the predict step's arguments to bench/raster_io.py")
    p.add_argument("--packing-steps", type=int, default=0, help="batches per epoch of the packing trials (default: "
                   "300 on CUDA, 2 on CPU)")  # fmt: skip
    p.add_argument("--tiles", default="", help="synthetic store size TRAIN,VAL (default 20000,1000; CPU 40,8)")
    p.add_argument("--data-dir", type=Path, help="where the synthetic store goes (default: /dev/shm or --out)")
    p.add_argument("--scale-args", default="", help="extra arguments of the scale step's gpu_scale.py search")
    a = p.parse_args()
    steps = set(a.only.split(","))
    if not steps <= set(STEPS):
        p.error(f"--only: unknown step(s) {', '.join(sorted(steps - set(STEPS)))}")
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    gpu = a.device == "cuda"
    t0 = time.perf_counter()
    rows: list[tuple[str, str]] = []
    rates: dict[str, dict] = {}
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TUNE_AGB_CACHE": str(out / "cache")}

    def left() -> float:
        return a.budget_s - (time.perf_counter() - t0)

    def cap(seconds: float) -> float:
        return max(5.0, min(seconds, left()))

    def grep(log: Path, *needles: str) -> None:
        for line in log.read_text(errors="replace").splitlines() if log.is_file() else []:
            if any(n in line for n in needles):
                rows.append(("  ", line.strip()[:220]))

    # 1. the machine
    if gpu:
        run(["nvidia-smi"], out / "nvidia-smi.txt", 30)
    versions = (
        "import torch, sys, platform; print(sys.version.split()[0], torch.__version__, torch.version.cuda, "
        "torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no cuda', "
        "torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 0, "
        "torch.backends.cudnn.version(), platform.node())"
    )
    run([sys.executable, "-c", versions], out / "versions.txt", 60, env)
    info = (out / "versions.txt").read_text().split()
    total_gb = int(info[-3]) / 2**30 if len(info) >= 3 and info[-3].isdigit() else 0.0
    rows.append(("python, torch, CUDA, card, memory, cuDNN", tail(out / "versions.txt")))
    run(["df", "-h", "/dev/shm", "/tmp", str(out)], out / "df.txt", 10)

    # 2. the training step, side by side with the original-style loop, then lever by lever
    if "throughput" in steps:
        size = (
            ["--tile", "244", "--base-channels", "64", "--depth", "4", "--batch-size", "16", "--tiles", "128",
             "--steps", "25", "--levers", "--lever-batches", "8,32", "--compile-modes", "fused", "--profile", "3"]
            if gpu
            else ["--tile", "64", "--base-channels", "8", "--depth", "2", "--batch-size", "4", "--tiles", "16",
                  "--steps", "4", "--levers", "--lever-batches", "8", "--compile-modes", ""]
        )  # fmt: skip
        size = a.throughput_args.split() if a.throughput_args else size
        cmd = [sys.executable, "bench/train_throughput.py", "--device", a.device, *size]
        cmd += ["--json", str(out / "throughput.json")]
        code, secs = run(cmd, out / "throughput.log", cap(a.throughput_s), env)
        rows.append(("train_throughput 244 px base 64", f"exit {code} in {secs:.0f} s"))
        grep(out / "throughput.log", "samples/s", "speed-up", "ceiling", "failed", "FLOP per")

    # 3. predict on an 8192 x 8192 stack
    if "predict" in steps and left() > 40:
        pargs = (
            a.predict_args.split()
            if a.predict_args
            else ["--size", "8192" if gpu else "512", "--skip-prepare", "--device", a.device, "--seam-margin", "16",
                  "--base-channels", "32" if gpu else "4", "--depth", "4" if gpu else "2", "--timeout", "40",
                  "--predict-tile", "1024" if gpu else "256", "--batch-size", "8" if gpu else "2"]
        )  # fmt: skip
        pdir = pick_data_dir([Path("/dev/shm/tune_agb_predict"), out / "predict"], 12 if gpu else 0.1)
        cmd = [sys.executable, "bench/raster_io.py", *pargs, "--json", str(out / "predict.json")]
        cmd += ["--workdir", str(pdir)] if pdir else []
        code, secs = run(cmd, out / "predict.log", cap(55), env)
        rows.append(("predict (bench/raster_io.py)", f"exit {code} in {secs:.0f} s: {tail(out / 'predict.log')}"))
        grep(out / "predict.log", "Mpx/s")
        if pdir:
            shutil.rmtree(pdir, ignore_errors=True)

    # the synthetic store, written while the tests run (CPU work beside GPU work)
    store_proc, data = None, None
    if steps & {"quarter", "whole", "scale"}:
        ntrain, nval = (int(v) for v in (a.tiles or ("20000,1000" if gpu else "40,8")).split(","))
        tile = 244 if gpu else 64
        need = (ntrain + nval) * tile * tile * (14 * 2 + 4) / 1e9 * 1.05 + 1
        root = a.data_dir or pick_data_dir([Path("/dev/shm/tune_agb_scale"), out / "scale_data"], need)
        if root is None:
            rows.append(("synthetic store", f"no folder with {need:.0f} GB free (see df.txt)"))
        else:
            data = root / "data"
            workers = max(1, min(12, (os.cpu_count() or 2) - 4))
            cmd = [sys.executable, "bench/gpu_scale.py", "store", "--out", str(data), "--train", str(ntrain),
                   "--val", str(nval), "--tile", str(tile), "--workers", str(workers), "--overwrite"]  # fmt: skip
            store_log = (out / "store.log").open("w")
            store_t0 = time.perf_counter()
            store_proc = subprocess.Popen(cmd, stdout=store_log, stderr=subprocess.STDOUT, cwd=REPO, env=env)

    # 4. the CUDA tests
    if gpu and "tests" in steps:
        code, secs = run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-m",
                "cuda",
                "-v",
                "-rs",
                "-p",
                "no:cacheprovider",
                "tests/test_cuda.py",
                "tests/test_trainable.py",
                "--durations=0",
                f"--junitxml={out / 'pytest_cuda.xml'}",
            ],
            out / "pytest_cuda.log",
            cap(a.tests_s),
            env,
        )
        rows.append(("pytest -m cuda", f"exit {code} in {secs:.0f} s: {tail(out / 'pytest_cuda.log')}"))

    if store_proc is not None:
        try:
            code = store_proc.wait(timeout=cap(120))
        except subprocess.TimeoutExpired:
            store_proc.kill()
            code = 124
        rows.append(("synthetic store (gpu_scale.py store)", f"exit {code}, {time.perf_counter() - store_t0:.0f} s "
                     f"since its start: {tail(out / 'store.log')}"))  # fmt: skip
        if code != 0:
            data = None
    store_env = env | {"TUNE_AGB_STORE": str(data / "store")} if data else env

    # 5. packing trials on one card: the real model on the synthetic store, FIFO, every trial to max_t
    space = yaml.safe_load((REPO / "search_spaces" / "demo.yaml").read_text())
    space["scheduler"] = {"type": "fifo", "max_t": 2}
    space["experiment"]["time_budget_s"] = None
    space["params"].pop("base_channels", None)
    for point in space["searcher"].get("points_to_evaluate", []):
        point.pop("base_channels", None)
    space["fixed"] |= {
        "base_channels": 32 if gpu else 4,
        "depth": 4 if gpu else 2,
        "batch_size": 16 if gpu else 4,
        "steps_per_epoch": a.packing_steps or (300 if gpu else 2),
        "data_mode": "stream",
    }
    space_path = out / "gpu_space.yaml"
    space_path.write_text(yaml.safe_dump(space, sort_keys=False))
    plans = (("quarter", "0.25", "4", "4"), ("whole", "1", "1", "1")) if gpu else (("quarter", "0", "2", "2"),)
    for name, frac, conc, n in plans:
        if name not in steps:
            continue
        if data is None or left() < 45:
            rows.append((f"search {name}", "skipped: " + ("no synthetic store" if data is None else "out of time")))
            continue
        cmd = [
            sys.executable, "-m", "tune_agb.search", "--space", str(space_path), "--storage", str(out / "ray"),
            "--name", name, "--gpus-per-trial", frac, "--cpus-per-trial", "3" if gpu else "1", "--max-concurrent", conc,
            "--num-samples", n, "--input-dir", str(data / "inputs"), "--label-dir", str(data / "labels"),
        ]  # fmt: skip
        sampler = GpuSampler(out / f"nvidia_smi_{name}.log") if gpu else None
        if sampler:
            sampler.__enter__()
        try:
            code, secs = run(cmd, out / f"search_{name}.log", cap(150), store_env)
        finally:
            if sampler:
                sampler.__exit__()
        res = out / "ray" / name / "results.parquet"
        if code == 0 and res.is_file():
            share = float(frac) * total_gb if gpu and float(frac) < 1 else None
            r = rates[name] = search_rates(res, share) | {"command_s": secs}
            if sampler:
                r["nvidia_smi_most_processes"] = sampler.most
            mem = ""
            if "max_trial_peak_gb" in r:
                mem = f", trials' peak <= {r['max_trial_peak_gb']:.2f} GiB"
                mem += f" (share {share:.1f} GiB)" if share else ""
            rows.append(
                (
                    f"search {name} ({frac} GPU x {conc})",
                    f"{r['trial_epochs']} trial-epochs of {r['trials']} trials, {r['epochs_per_min']:.1f}/min, "
                    f"peak {r['peak_parallel']} trials at once{mem}, {secs:.0f} s"
                    + (f", nvidia-smi saw {sampler.most} processes" if sampler else ""),
                )
            )
        else:
            rows.append((f"search {name}", f"exit {code} after {secs:.0f} s: {tail(out / f'search_{name}.log', 3)}"))
    if {"quarter", "whole"} <= rates.keys():
        ratio = rates["quarter"]["epochs_per_min"] / rates["whole"]["epochs_per_min"]
        rates["ratio"] = {"quarter_over_whole": ratio}
        rows.append(("0.25-GPU trials vs one at a time", f"{ratio:.2f}x aggregate trial-epochs/min (target >= 2.5x)"))

    # 6. the search at scale: fractional GPUs, ASHA, SIGKILL and --resume
    if "scale" in steps:
        if data is None or left() < 60:
            rows.append(("scale search", "skipped: " + ("no synthetic store" if data is None else "out of time")))
        else:
            budget = left() - 10
            cmd = [sys.executable, "bench/gpu_scale.py", "search", "--data", str(data), "--out", str(out / "scale"),
                   "--budget-s", f"{budget:.0f}"]  # fmt: skip
            cmd += (
                ["--gpus-per-trial", "0.25", "--max-concurrent", "4", "--cpus-per-trial", "3", "--num-samples", "4",
                 "--max-t", "2", "--kill-after", f"{min(60, budget / 2):.0f}", "--base-channels", "16",
                 "--batch-sizes", "32"]
                if gpu
                else ["--gpus-per-trial", "0", "--max-concurrent", "2", "--cpus-per-trial", "1", "--num-samples", "3",
                      "--max-t", "2", "--kill-after", "20", "--base-channels", "4", "--depth", "2",
                      "--batch-sizes", "4"]
            )  # fmt: skip
            cmd += a.scale_args.split()
            code, secs = run(cmd, out / "scale.log", budget + 8, store_env)
            rows.append(("scale search (gpu_scale.py search)", f"exit {code} in {secs:.0f} s"))
            for line in (out / "scale.log").read_text(errors="replace").splitlines()[-14:]:
                rows.append(("  ", line.strip()[:220]))
        if data is not None and a.data_dir is None:
            shutil.rmtree(data.parent, ignore_errors=True)

    # 7. an infeasible configuration beside feasible ones, at 0.25 GPU
    if left() > 50 and "infeasible" in steps:
        from tune_agb.demo_data import write_demo_dataset

        tile = 244 if gpu else 64
        data = write_demo_dataset(out / "big_tiles", tile=tile, grid=(6, 6), seed=5)
        big = 512 if gpu else 4
        inf_space = {
            "experiment": {
                "metric": "val_rmse",
                "mode": "min",
                "num_samples": 4,
                "max_concurrent": 4,
                "max_failures": 0,
            },
            "scheduler": {"type": "fifo", "max_t": 2},
            "searcher": {
                "type": "optuna",
                "seed": 0,
                "n_startup_trials": 4,
                "points_to_evaluate": [{"base_channels": c} for c in (16, big, 16, 16)],
            },
            "resources": {"cpu": 2, "gpu": 0.25 if gpu else 0},
            "fixed": {"depth": 4, "batch_size": 4, "lr": 2.0e-3, "schedule": "constant"},
            "params": {"base_channels": {"type": "categorical", "choices": [16, big]}},
        }
        inf_path = out / "infeasible_space.yaml"
        inf_path.write_text(yaml.safe_dump(inf_space, sort_keys=False))
        cmd = [
            sys.executable, "-m", "tune_agb.search", "--space", str(inf_path), "--storage", str(out / "ray"),
            "--name", "infeasible", "--input-dir", str(data / "inputs"), "--label-dir", str(data / "labels"),
        ]  # fmt: skip
        code, secs = run(cmd, out / "search_infeasible.log", cap(90), env)
        res = out / "ray" / "infeasible" / "results.parquet"
        if res.is_file():
            import pandas as pd

            df = pd.read_parquet(res)
            bad = df[df["infeasible"].notna()] if "infeasible" in df else df.iloc[:0]
            ok = df[df["infeasible"].isna()] if "infeasible" in df else df
            done = ok.groupby("trial_id")["epoch"].max()
            reason = bad["infeasible"].iloc[0] if len(bad) else "none reported"
            oom = "out of memory" in (out / "search_infeasible.log").read_text(errors="replace").lower()
            rows.append(
                (
                    "infeasible config at 0.25 GPU",
                    f"exit {code} in {secs:.0f} s; {bad['trial_id'].nunique()} infeasible ({reason}); "
                    f"{int((done >= 2).sum())} of {len(done)} others finished; 'out of memory' in log: {oom}",
                )
            )
        else:
            rows.append(("infeasible config", f"exit {code}: {tail(out / 'search_infeasible.log', 3)}"))

    rows.append(("whole check", f"{time.perf_counter() - t0:.0f} s"))
    (out / "summary.json").write_text(json.dumps({"rows": rows, "rates": rates}, indent=1, default=float))
    print("\nGPU check summary")
    for k, v in rows:
        print(f"- {k}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
