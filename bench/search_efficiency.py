"""Optuna + ASHA against random search that trains every trial to max_t: trial-epochs spent and best val RMSE.

    python bench/search_efficiency.py [--space search_spaces/demo.yaml] [--num-samples N] [--out DIR]

Both searches use the same space file, number of trials, searcher seed and training seed, on the demo data (or
--input-dir/--label-dir), through the real CLI entry point on one local Ray instance. Target (issue 3): Optuna + ASHA
within 2 % of random search's best RMSE with at most 40 % of its trial-epochs.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

from tune_agb.search.cli import main as search_main

REPO = Path(__file__).resolve().parents[1]


def run(space: dict, name: str, out: Path, data: list[str]) -> tuple[pd.DataFrame, float]:
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    start = time.perf_counter()
    code = search_main(["--space", str(path), "--storage", str(out / "runs"), "--name", name, *data])
    if code != 0:
        raise SystemExit(f"{name}: search exited with {code}")
    return pd.read_parquet(out / "runs" / name / "results.parquet"), time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--space", default=str(REPO / "search_spaces" / "demo.yaml"))
    p.add_argument("--num-samples", type=int, help="trials per search (default: the space's)")
    p.add_argument("--input-dir")
    p.add_argument("--label-dir")
    p.add_argument("--out", help="folder for the two experiments (default: a temporary one)")
    a = p.parse_args()
    base = yaml.safe_load(Path(a.space).read_text())
    base.setdefault("experiment", {})["time_budget_s"] = None  # both searches must finish all their trials
    if a.num_samples:
        base["experiment"]["num_samples"] = a.num_samples
    data = ["--input-dir", a.input_dir, "--label-dir", a.label_dir] if a.input_dir else []
    out = Path(a.out or tempfile.mkdtemp(prefix="search_eff_"))
    out.mkdir(parents=True, exist_ok=True)

    import ray

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        asha = {**base, "scheduler": {**base["scheduler"], "type": "asha"}, "searcher": {**base["searcher"]}}
        asha["searcher"]["type"] = "optuna"
        rand = {**base, "scheduler": {**base["scheduler"], "type": "fifo"}, "searcher": {**base["searcher"]}}
        rand["searcher"]["type"] = "random"
        df_a, t_a = run(asha, "optuna_asha", out, data)
        df_r, t_r = run(rand, "random_full", out, data)
    finally:
        ray.shutdown()

    rows = []
    for label, df, secs in (("optuna + asha", df_a, t_a), ("random, all to max_t", df_r, t_r)):
        rows.append(
            {
                "search": label,
                "trials": df["trial_id"].nunique(),
                "trial_epochs": len(df),
                "best_val_rmse": df["val_rmse"].min(),
                "wall_s": secs,
            }
        )
    table = pd.DataFrame(rows)
    ratio_epochs = rows[0]["trial_epochs"] / rows[1]["trial_epochs"]
    gap = rows[0]["best_val_rmse"] / rows[1]["best_val_rmse"] - 1
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"cuda={torch.cuda.is_available()}; space {a.space}, max_t {base['scheduler']['max_t']}"
    )
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"optuna+asha trial-epochs = {ratio_epochs:.1%} of random search's (target <= 40%)")
    print(f"optuna+asha best val RMSE is {gap:+.2%} vs random search's (target <= +2%)")
    print(f"experiments in {out}")


if __name__ == "__main__":
    main()
