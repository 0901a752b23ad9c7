"""The one prepared GPU check: run it on a CUDA host (see ../shared/gpu/README.md for the offline wheels).

    python bench/gpu_check.py --out gpu_check_out [--budget-s 480]

Steps, each a subprocess with its log under ``--out``, ending with a short table:
1. ``nvidia-smi``;
2. the CUDA-marked tests (``pytest -m cuda``): bf16 autocast, channels_last, resident data, no per-batch host sync,
   a fractional-GPU trial;
3. two searches on the demo data with every trial trained to max_t (FIFO): four trials at 0.25 GPU at once, and one
   trial at a time on the whole GPU; from their ``results.parquet``: aggregate trial-epochs per minute and the
   largest number of trials that ran at the same time (target: >= 2.5x for the 0.25-GPU search);
4. ``bench/train_throughput.py`` for the base-64, depth-4 U-Net at 244 px (targets: >= 2x the baseline, >= 35 % of
   the card's bf16 dense peak).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str], log: Path, timeout: float) -> tuple[int, float]:
    start = time.perf_counter()
    with log.open("w") as f:
        try:
            code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = 124
    return code, time.perf_counter() - start


def search_rates(results: Path) -> dict[str, float]:
    """Trial-epochs per minute over the search's reporting span, and the peak number of overlapping trials."""
    import pandas as pd

    df = pd.read_parquet(results)
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
    return {"trial_epochs": len(df), "minutes": minutes, "epochs_per_min": len(df) / minutes, "peak_parallel": peak}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("gpu_check_out"))
    p.add_argument("--budget-s", type=float, default=480, help="stop starting steps after this many seconds")
    a = p.parse_args()
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows: list[tuple[str, str]] = []

    def left() -> float:
        return a.budget_s - (time.perf_counter() - t0)

    run(["nvidia-smi"], out / "nvidia-smi.txt", 30)
    code, secs = run(
        [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "tests"],
        out / "pytest_cuda.log",
        max(30, min(180, left())),
    )
    tail = (out / "pytest_cuda.log").read_text().strip().splitlines()[-1:] or ["(no output)"]
    rows.append(("pytest -m cuda", f"exit {code} in {secs:.0f} s: {tail[0]}"))

    space = yaml.safe_load((REPO / "search_spaces" / "demo.yaml").read_text())
    space["scheduler"] = {"type": "fifo", "max_t": 6}
    space["experiment"]["time_budget_s"] = None
    space_path = out / "gpu_space.yaml"
    space_path.write_text(yaml.safe_dump(space, sort_keys=False))
    rates = {}
    for name, gpu, conc, n in (("quarter", "0.25", "4", "8"), ("whole", "1", "1", "3")):
        if left() < 90:
            rows.append((f"search {name}", "skipped: out of time"))
            continue
        cmd = [
            sys.executable,
            "-m",
            "tune_agb.search",
            "--space",
            str(space_path),
            "--storage",
            str(out / "ray"),
            "--name",
            name,
            "--gpus-per-trial",
            gpu,
            "--cpus-per-trial",
            "2",
            "--max-concurrent",
            conc,
            "--num-samples",
            n,
        ]
        code, secs = run(cmd, out / f"search_{name}.log", max(60, min(240, left() - 60)))
        res = out / "ray" / name / "results.parquet"
        if code == 0 and res.is_file():
            rates[name] = search_rates(res)
            r = rates[name]
            rows.append(
                (
                    f"search {name} ({gpu} GPU x {conc})",
                    f"{r['trial_epochs']} trial-epochs, "
                    f"{r['epochs_per_min']:.1f}/min, peak {r['peak_parallel']} trials at once, {secs:.0f} s",
                )
            )
        else:
            rows.append((f"search {name}", f"exit {code} after {secs:.0f} s (see search_{name}.log)"))
    if {"quarter", "whole"} <= rates.keys():
        ratio = rates["quarter"]["epochs_per_min"] / rates["whole"]["epochs_per_min"]
        rows.append(("0.25-GPU trials vs one at a time", f"{ratio:.2f}x aggregate trial-epochs/min (target >= 2.5x)"))

    if left() > 60:
        cmd = [
            sys.executable,
            "bench/train_throughput.py",
            "--device",
            "cuda",
            "--tile",
            "244",
            "--base-channels",
            "64",
            "--depth",
            "4",
            "--batch-size",
            "16",
            "--steps",
            "30",
            "--repeats",
            "2",
            "--json",
            str(out / "throughput.json"),
        ]
        code, secs = run(cmd, out / "throughput.log", max(60, left()))
        lines = (out / "throughput.log").read_text().strip().splitlines()
        rows.append(("train_throughput 244 px base 64", f"exit {code}: " + " | ".join(lines[-3:])))
    (out / "summary.json").write_text(json.dumps({"rows": rows, "rates": rates}, indent=1, default=float))
    print("\nGPU check summary")
    for k, v in rows:
        print(f"- {k}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
