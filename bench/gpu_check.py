"""The one prepared GPU check: run it on a CUDA host (see ../shared/gpu/README.md for the offline wheels).

    python bench/gpu_check.py --out gpu_check_out [--budget-s 450] [--device cuda|cpu]

Steps, each a subprocess with its log under ``--out``, each stopped at its share of the budget, then a short table:
1. ``nvidia-smi`` and the software versions;
2. the CUDA-marked tests (``pytest -m cuda``): bf16 autocast, channels_last, resident and streamed data, no per-batch
   host sync, the memory-fit check, torch.compile, a quarter-GPU trial within its cap, an infeasible trial;
3. ``bench/train_throughput.py`` for the base-64, depth-4 U-Net at 244 px, side by side with the original-style
   loop, then lever by lever (targets: >= 2x the baseline, >= 35 % of the card's bf16 dense peak);
4. two searches on the demo data with every trial trained to max_t (FIFO): four trials at 0.25 GPU at once, and one
   trial at a time on the whole GPU; from their ``results.parquet``: aggregate trial-epochs per minute, the most
   trials that ran at the same time and each trial's peak device memory against its share (target: >= 2.5x);
5. a search at 0.25 GPU where one configuration cannot fit its share (a 2-billion-weight U-Net): it must be
   reported as infeasible while its neighbours finish.

``--device cpu`` rehearses the plumbing on a machine without a GPU (small sizes, no GPU resources).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
STEPS = ("tests", "throughput", "quarter", "whole", "infeasible")


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
    p.add_argument("--budget-s", type=float, default=450, help="the whole check ends within this many seconds")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: rehearse without a GPU")
    p.add_argument("--only", default=",".join(STEPS), help=f"comma-separated steps among {', '.join(STEPS)}")
    p.add_argument("--throughput-args", default="", help="replace the throughput step's size and lever arguments")
    p.add_argument(
        "--packing-steps",
        type=int,
        default=0,
        help="packing searches with base-32 U-Nets and this many batches per epoch (default: the demo space as is, "
        "whose tiny trials leave the card mostly idle)",
    )
    a = p.parse_args()
    steps = set(a.only.split(","))
    if not steps <= set(STEPS):
        p.error(f"--only: unknown step(s) {', '.join(sorted(steps - set(STEPS)))}")
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    gpu = a.device == "cuda"
    t0 = time.perf_counter()
    rows: list[tuple[str, str]] = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TUNE_AGB_CACHE": str(out / "cache")}

    def left() -> float:
        return a.budget_s - (time.perf_counter() - t0)

    def cap(seconds: float) -> float:
        return max(5.0, min(seconds, left()))

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

    # 2. the CUDA tests
    if gpu and "tests" in steps:
        code, secs = run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-m",
                "cuda",
                "-q",
                "-rs",
                "-p",
                "no:cacheprovider",
                "tests/test_cuda.py",
                "tests/test_trainable.py",
                "--durations=0",
                f"--junitxml={out / 'pytest_cuda.xml'}",
            ],
            out / "pytest_cuda.log",
            cap(170),
            env | {"TORCHINDUCTOR_COMPILE_THREADS": "1"},  # no compile-worker pool left at exit
        )
        rows.append(("pytest -m cuda", f"exit {code} in {secs:.0f} s: {tail(out / 'pytest_cuda.log')}"))

    # 3. the training step, side by side with the original-style loop, then lever by lever
    if left() > 40 and "throughput" in steps:
        size = (
            ["--tile", "244", "--base-channels", "64", "--depth", "4", "--batch-size", "16", "--tiles", "128",
             "--steps", "30", "--repeats", "2", "--levers", "--lever-batches", "32,64",
             "--compile-modes", "default,reduce-overhead"]
            if gpu
            else ["--tile", "64", "--base-channels", "8", "--depth", "2", "--batch-size", "4", "--tiles", "16",
                  "--steps", "4", "--levers", "--lever-batches", "8", "--compile-modes", ""]
        )  # fmt: skip
        size = a.throughput_args.split() if a.throughput_args else size
        cmd = [sys.executable, "bench/train_throughput.py", "--device", a.device, *size]
        cmd += ["--json", str(out / "throughput.json")]
        code, secs = run(cmd, out / "throughput.log", cap(170), env)
        rows.append(("train_throughput 244 px base 64", f"exit {code} in {secs:.0f} s"))
        for line in (out / "throughput.log").read_text(errors="replace").splitlines():
            if "samples/s" in line or "speed-up" in line or "ceiling" in line or "failed" in line:
                rows.append(("  ", line.strip()))
    # 4. packing trials on one card: demo search, FIFO, every trial to max_t
    space = yaml.safe_load((REPO / "search_spaces" / "demo.yaml").read_text())
    space["scheduler"] = {"type": "fifo", "max_t": 6}
    space["experiment"]["time_budget_s"] = None
    if a.packing_steps:  # trials that keep the card busy: fixed base-32 U-Nets, many batches per epoch
        space["params"].pop("base_channels", None)
        for point in space["searcher"].get("points_to_evaluate", []):
            point.pop("base_channels", None)
        space["fixed"] |= {"base_channels": 32, "batch_size": 8, "steps_per_epoch": a.packing_steps}
        space["scheduler"]["max_t"] = 3
    space_path = out / "gpu_space.yaml"
    space_path.write_text(yaml.safe_dump(space, sort_keys=False))
    rates: dict[str, dict] = {}
    plans = (("quarter", "0.25", "4", "8"), ("whole", "1", "1", "3")) if gpu else (("quarter", "0", "2", "2"),)
    for name, frac, conc, n in plans:
        if name not in steps:
            continue
        if left() < 60:
            rows.append((f"search {name}", "skipped: out of time"))
            continue
        cmd = [
            sys.executable, "-m", "tune_agb.search", "--space", str(space_path), "--storage", str(out / "ray"),
            "--name", name, "--gpus-per-trial", frac, "--cpus-per-trial", "2", "--max-concurrent", conc,
            "--num-samples", n,
        ]  # fmt: skip
        sampler = GpuSampler(out / f"nvidia_smi_{name}.log") if gpu else None
        if sampler:
            sampler.__enter__()
        try:
            code, secs = run(cmd, out / f"search_{name}.log", cap(110), env)
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

    # 5. an infeasible configuration beside feasible ones, at 0.25 GPU
    if left() > 50 and "infeasible" in steps:
        from tune_agb.demo import write_demo_dataset

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
