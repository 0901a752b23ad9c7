"""Screen training options on the real tiles: one configuration and its variants, over outer spatial folds and seeds.

    python bench/config_screen.py [--data ../shared/data/gedi-s1s2-real] [--outer-k 3] [--seeds 0,1,2]
        [--space search_spaces/real-cpu.yaml] [--variant NAME:KEY=VALUE,KEY=VALUE ...]
        [--workers 2] [--out DIR] [--json FILE]

A search's answer is only as good as its space. Before an option goes into a space (or into the engine's defaults),
this measures it on its own: the base configuration is the space's ``fixed`` section plus its first
``points_to_evaluate`` entry, trained for the scheduler's ``max_t`` epochs (for real-cpu: base 16, depth 3, the
engine's default optimiser settings, 27 epochs); ``--space engine`` takes the engine's default configuration
(what ``final_train`` trains without flags) instead. Each ``--variant`` changes some of its keys (``plain`` with no
change is always run). Every variant is trained by ``final_train --config`` once per seed on each of the outer
folds of ``real_selection.py --outer-k`` (same strips, same folders of links), and a row pools the folds' test
predictions: all the labelled pixels once, with the variance calibration each run ships (``scale`` on val).

Runs go two at a time (``--workers``), one torch thread each. Finished runs under ``--out`` are read back, so an
interrupted screen continues. Output: per variant, mean +- sd over seeds of the pooled test RMSE, R2 and coverage.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_selection import ROOT, mean_sd, outer_data, outer_splits, pooled, tile_labels  # same folder


def base_config(space: dict[str, Any]) -> dict[str, Any]:
    """The space's fixed keys, its first point to evaluate, and max_t epochs."""
    points = (space.get("searcher") or {}).get("points_to_evaluate") or [{}]
    return {**(space.get("fixed") or {}), **points[0], "epochs": int(space["scheduler"]["max_t"])}


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME:KEY=VALUE,KEY=VALUE`` (values parsed as YAML) -> (NAME, changes). A comma starts a new item only
    before ``KEY=``, so a value may hold commas: ``w:init_weights=/runs/a,b/best.pt,lr=0.001``."""
    name, sep, rest = text.partition(":")
    if not sep or not name:
        raise SystemExit(f"--variant: expected NAME:KEY=VALUE[,KEY=VALUE], got {text!r}")
    changes = {}
    for item in (i for i in re.split(r",(?=\s*[A-Za-z_]\w*\s*=)", rest) if i.strip()):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise SystemExit(f"--variant {text}: expected KEY=VALUE, got {item!r}")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML 1.1 reads 1e-3 as a string
            with contextlib.suppress(ValueError):
                parsed = float(parsed)
        changes[key.strip()] = parsed
    return name, changes


def train_one(run: Path, config: Path, seed: int, data: list[str]) -> dict[str, Any]:
    """final_train --config in a subprocess (one torch thread) unless ``run`` finished; its test metrics."""
    metrics = run / "metrics.json"
    if not metrics.exists():
        cmd = [sys.executable, "-m", "tune_agb.final_train", "--config", str(config), "--seed", str(seed), *data,
               "--out-dir", str(run), "--overwrite", "--no-progress"]  # fmt: skip
        env = os.environ | {
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        start = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{run}: final_train exited with {done.returncode}:\n{done.stderr[-2000:]}")
        (run / "seconds.json").write_text(json.dumps({"seconds": time.perf_counter() - start}))
    m = json.loads(metrics.read_text())
    secs = json.loads((run / "seconds.json").read_text())["seconds"] if (run / "seconds.json").exists() else 0.0
    return {"test_rmse": m["test_rmse"], "run": str(run), "seconds": secs}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "gedi-s1s2-real"))
    p.add_argument("--outer-k", type=int, default=3)
    p.add_argument("--outer-val-share", type=float, default=0.15)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument(
        "--space",
        default=str(ROOT / "search_spaces" / "real-cpu.yaml"),
        help="the space whose fixed keys + first point are the base; 'engine': the engine's default configuration",
    )
    p.add_argument("--variant", action="append", default=[], help="NAME:KEY=VALUE[,KEY=VALUE] (repeatable)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", required=True, help="folder for the fold links, configs and runs")
    p.add_argument("--json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    base = {} if a.space == "engine" else base_config(yaml.safe_load(Path(a.space).read_text()))
    variants = dict([("plain", {}), *(parse_variant(v) for v in a.variant)])
    from tune_agb.engine.config import config_from_dict
    from tune_agb.errors import TuneAgbError

    for name, changes in variants.items():  # every variant a valid config before anything trains
        try:
            config_from_dict({**base, **changes}, source=f"--variant {name}")
        except TuneAgbError as exc:
            raise SystemExit(str(exc)) from None
    out, data_dir = Path(a.out), Path(a.data)
    folds = outer_splits(tile_labels(data_dir), a.outer_k, a.outer_val_share)
    fold_data = [outer_data(data_dir, f, out / f"outer{j}" / "data") for j, f in enumerate(folds)]
    jobs = []
    for name, changes in variants.items():
        text = yaml.safe_dump({**base, **changes}, sort_keys=False)
        configs = []
        for j in range(len(fold_data)):  # a value may name the outer fold, {fold}: one config per fold then
            config = out / "configs" / (f"{name}.yaml" if "{fold}" not in text else f"{name}_f{j}.yaml")
            config.parent.mkdir(parents=True, exist_ok=True)
            config.write_text(text.replace("{fold}", str(j)))
            configs.append(config)
        jobs += [
            (name, s, j, out / "runs" / name / f"s{s}_f{j}", configs[j], d)
            for s in seeds
            for j, d in enumerate(fold_data)
        ]
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(a.workers) as pool:
        got = list(pool.map(lambda job: train_one(job[3], job[4], job[1], job[5]), jobs))
    results = {(job[0], job[1], job[2]): r for job, r in zip(jobs, got, strict=True)}
    rows, summary = [], []
    for name in variants:
        per_seed = [pooled(name, s, [results[name, s, j] for j in range(len(folds))])[0] for s in seeds]
        rows += per_seed
        line = {"variant": name, "changes": variants[name]}
        for key in ("test_rmse", "test_r2", "test_within_1sigma", "test_within_2sigma"):
            line[key] = mean_sd([r[key] for r in per_seed])
        line["per_seed_rmse"] = [r["test_rmse"] for r in per_seed]
        summary.append(line)
    header = (
        f"Machine: {platform.processor() or platform.machine()}, {a.workers} runs at a time, 1 torch thread each. "
        f"Data {data_dir}, {a.outer_k} outer folds pooled ({rows[0]['test_n']} test labels), seeds "
        f"{a.seeds}. Base: {json.dumps(base)}. Wall time {(time.perf_counter() - start) / 60:.1f} min (reused runs "
        f"included).\nCommand: `python bench/config_screen.py {' '.join(sys.argv[1:] if argv is None else argv)}`"
    )
    lines = ["", "| variant | changes | test RMSE (m) | per seed | R2 | within 1 sigma | within 2 sigma |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in summary:
        lines.append(
            f"| {s['variant']} | {json.dumps(s['changes']) if s['changes'] else '-'} | {s['test_rmse'][0]:.2f} +- "
            f"{s['test_rmse'][1]:.2f} | {' / '.join(f'{v:.2f}' for v in s['per_seed_rmse'])} | "
            f"{s['test_r2'][0]:.3f} | {100 * s['test_within_1sigma'][0]:.1f} % | "
            f"{100 * s['test_within_2sigma'][0]:.1f} % |"
        )
    print(header + "\n".join(lines))
    if a.json:
        Path(a.json).write_text(json.dumps({"header": header, "rows": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
