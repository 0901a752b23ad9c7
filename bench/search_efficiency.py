"""Search efficiency across seeds: Optuna + ASHA, random + ASHA, random to max_t and variants (issue 13).

    python bench/search_efficiency.py [--space search_spaces/demo.yaml] [--seeds 0,1,2,3,4]
        [--methods optuna_asha,random_asha,random_full,wsd] [--variant NAME:SECTION.KEY=VALUE ...]
        [--set SECTION.KEY=VALUE ...] [--num-samples N] [--out DIR] [--json FILE]

For each seed ``s``, every method runs one search through the search's Python API (``tune_agb.search.run``)
on one local Ray instance (started once), with the searcher seed and the training seed (``fixed.seed``) both set
to ``s``, on the same space, data and number of trials; the time budget is switched off so every search finishes
all its trials. Then the best configuration of each search is retrained by ``tune_agb.final_train --experiment``
(``max_t`` epochs, the search's training seed) and evaluated on the test split. The same configuration is trained
once: methods that pick the same trial config share the retrained model (a search's best config holds its seed).

Methods:

- ``optuna_asha``: the space as configured (Optuna TPE + ASHA);
- ``random_asha``: Optuna's RandomSampler with the same ASHA rungs;
- ``random_full``: RandomSampler, scheduler ``fifo`` (every trial to ``max_t``): the reference;
- variants: ``--variant NAME:SECTION.KEY=VALUE`` is ``optuna_asha`` with that change (the value is read as YAML;
  ``null`` removes the key; repeat a NAME to change several keys). Given variants replace the default one,
  ``wsd:fixed.schedule=wsd``. E.g. ``--variant grace4:scheduler.grace_period=4``,
  ``--variant brackets2:scheduler.brackets=2``, ``--variant noliar:searcher.constant_liar=false``,
  ``--variant startup8:searcher.n_startup_trials=8``.

``--set SECTION.KEY=VALUE`` changes the space of every method (e.g. ``--set scheduler.max_t=4`` for a smoke run).

Figures, per seed and method: trials, trial-epochs (rows of ``results.parquet``: one per trial and epoch), best
val RMSE (over every epoch of every trial) and the test RMSE of the retrained best configuration. Over the seeds,
median and worst case of: trial-epochs as a share of ``random_full``'s of the same seed, best-val gap to
``random_full`` (%), test RMSE.

"Beats random + ASHA at equal trial-epochs": the reports of ``random_asha`` are put in the order they were made
(their ``wall_time``: with two trials at once, this interleaves the trials as the search spent its epochs), and its
best val RMSE over the first ``K`` of them is compared with the method's best over all of its ``K`` trial-epochs.
When ``random_asha`` spent fewer than ``K``, its best over all of them is used. A method beats it on a seed when its
best is strictly lower; the summary gives the seeds won and the median relative difference (negative = better).

Issue 13's target, over the seeds, for Optuna + ASHA: trial-epochs <= 40 % of the reference's (median); best val
within 2 % of the reference's at the median and within 5 % in the worst case; beats random + ASHA at equal
trial-epochs at the median.

Expected time on the 2-core demo machine with the default arguments (5 seeds x 4 methods, 16 trials, max_t 16),
from earlier runs of the same searches: per seed about 110 s for random_full, 85-105 s for each ASHA search and
15-25 s per distinct retrained config (methods often share one), i.e. 6.5-8 minutes a seed, 33-40 minutes in
all, on a quiet machine. The script prints its elapsed time and a projection after each seed. Searches and
retrained models are kept under ``--out``: a rerun with the same ``--out`` reuses every search that finished with
the same space and every retrained config, so an interrupted run continues where it stopped, and seeds can be run
in parts (``--seeds 0,1,2``, then ``--seeds 3,4``, then all five for the table, which is then only read back).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml

import tune_agb.search
from tune_agb.errors import TuneAgbError
from tune_agb.overrides import apply_overrides, parse_override
from tune_agb.runs import RESULTS_FILE, Best, read_best, read_results
from tune_agb.search.experiment import Experiment
from tune_agb.search.space import parse_search_space

REPO = Path(__file__).resolve().parents[1]
BUILTIN: dict[str, dict[str, Any]] = {
    "optuna_asha": {"searcher.type": "optuna", "scheduler.type": "asha"},
    "random_asha": {"searcher.type": "random", "scheduler.type": "asha"},
    "random_full": {"searcher.type": "random", "scheduler.type": "fifo"},
}
REFERENCE, RANDOM_ASHA = "random_full", "random_asha"
DEFAULT_VARIANTS = ["wsd:fixed.schedule=wsd"]


# -- the spaces ---------------------------------------------------------------------------------------------------
def parse_change(text: str, flag: str) -> tuple[str, Any]:
    """``SECTION.KEY=VALUE`` -> (``SECTION.KEY``, VALUE read as YAML): :func:`tune_agb.overrides.parse_override`."""
    try:
        return parse_override(text, flag)
    except TuneAgbError as exc:
        raise SystemExit(str(exc)) from None


def parse_variants(specs: list[str]) -> dict[str, dict[str, Any]]:
    """``NAME:SECTION.KEY=VALUE`` flags -> {NAME: {SECTION.KEY: VALUE}}; a repeated NAME collects its changes."""
    out: dict[str, dict[str, Any]] = {}
    for spec in specs:
        name, colon, change = spec.partition(":")
        if not colon or not name or name in BUILTIN:
            raise SystemExit(
                f"--variant {spec}: expected NAME:SECTION.KEY=VALUE with a NAME not in {', '.join(BUILTIN)}"
            )
        key, value = parse_change(change, "--variant")
        out.setdefault(name, {})[key] = value
    return out


def apply_changes(raw: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A copy of the space document with ``{dotted.path: value}`` set (None deletes the key)."""
    try:
        raw = apply_overrides(raw, {k: v for k, v in changes.items() if v is not None})
    except TuneAgbError as exc:
        raise SystemExit(str(exc)) from None
    for path in (k for k, v in changes.items() if v is None):
        *parents, last = path.split(".")
        node: Any = raw
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return raw


def method_space(base: dict[str, Any], method: str, variants: dict[str, dict[str, Any]], seed: int) -> dict[str, Any]:
    """The space document of one method and seed: the searcher seed and the training seed are both ``seed``."""
    changes = dict(BUILTIN.get(method) or {**BUILTIN["optuna_asha"], **variants[method]})
    changes |= {"searcher.seed": seed, "fixed.seed": seed}
    return apply_changes(base, changes)


def load_base(space: Path, sets: list[str], num_samples: int | None) -> dict[str, Any]:
    raw = yaml.safe_load(space.read_text())
    raw.setdefault("experiment", {})["time_budget_s"] = None  # every search must finish all its trials
    if num_samples:
        raw["experiment"]["num_samples"] = num_samples
    data = raw.get("data") or {}
    for key in ("input_dir", "label_dir"):  # relative to the space file; the copies live elsewhere
        if data.get(key):
            data[key] = str((space.parent / data[key]).resolve())
    return apply_changes(raw, dict(parse_change(s, "--set") for s in sets))


# -- one search and one retrained model -------------------------------------------------------------------------
def folders(data: list[str]) -> dict[str, str]:
    """The data flags ``["--input-dir", I, "--label-dir", L]`` (or ``[]``) as ``tune_agb.search.run``'s arguments."""
    flags = dict(zip(data[::2], data[1::2], strict=True))
    return {"input_dir": flags["--input-dir"], "label_dir": flags["--label-dir"]} if flags else {}


def run_name(method: str, seed: int) -> str:
    """The experiment folder of one method and seed under ``OUT/runs``."""
    return f"{method}_s{seed}"


def run_search(space: dict[str, Any], name: str, out: Path, data: list[str]) -> tuple[pd.DataFrame, Best, float]:
    """Run (or reuse, when it finished with the same space) one search; its results, best.yaml and search seconds."""
    path = out / "spaces" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    exp = Experiment.at(str(out / "runs"), name)
    timing = out / "timings" / f"{name}.json"
    results = Path(exp.uri) / RESULTS_FILE
    stored = exp.read_search() if exp.has_search() else None
    want = parse_search_space(space, source=str(path))
    if stored is not None and stored["space"] == want.to_dict() and results.exists() and timing.exists():
        df = read_results(exp.uri)
        if df["trial_id"].nunique() == want.settings["experiment"]["num_samples"]:
            print(f"{name}: reusing the finished search in {exp.uri}", flush=True)
            return df, read_best(exp.uri), json.loads(timing.read_text())["search_s"]
    if stored is not None:
        raise SystemExit(f"{exp.uri}: an unfinished or different search is there; delete it or use another --out")
    start = time.perf_counter()
    outcome = tune_agb.search.run(path, storage=out / "runs", name=name, **folders(data))
    secs = time.perf_counter() - start
    print(outcome.summary(), flush=True)
    if not outcome.complete or outcome.best is None:
        raise SystemExit(f"{name}: the search did not finish ({outcome.incomplete or 'no finite result'})")
    timing.parent.mkdir(parents=True, exist_ok=True)
    timing.write_text(json.dumps({"search_s": secs}))
    return outcome.results, outcome.best, secs


def retrain(experiment: str, config: dict[str, Any], out: Path) -> tuple[float, float, str]:
    """Test RMSE of ``config`` retrained by final_train from ``experiment``'s best.yaml, the seconds that took, and
    the config's key.

    The output folder is named by the key (a hash of the config), so a config already trained (by another method,
    or an earlier run) is read back, not trained again."""
    import tune_agb.final_train

    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    run = out / "final" / key
    metrics, timing = run / "metrics.json", out / "timings" / f"final_{key}.json"
    if not (metrics.exists() and timing.exists()):
        start = time.perf_counter()
        tune_agb.final_train.run(experiment=experiment, out_dir=run, progress=False, overwrite=True)
        timing.parent.mkdir(parents=True, exist_ok=True)
        timing.write_text(json.dumps({"final_s": time.perf_counter() - start}))
    return json.loads(metrics.read_text())["test_rmse"], json.loads(timing.read_text())["final_s"], key


# -- figures ------------------------------------------------------------------------------------------------------
def best_within(df: pd.DataFrame, budget: int) -> float:
    """Best val RMSE over the first ``budget`` epoch reports, in the order they were made (wall_time)."""
    first = df.sort_values(["wall_time", "trial_id", "epoch"]).head(budget)
    return float(first["val_rmse"].min())


def seed_rows(seed: int, found: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-method figures of one seed, relative to random_full and random_asha where those ran."""
    ref, rnd = found.get(REFERENCE), found.get(RANDOM_ASHA)
    rows = []
    for method, f in found.items():
        df = f["df"]
        row: dict[str, Any] = {
            "seed": seed,
            "method": method,
            "trials": int(df["trial_id"].nunique()),
            "trial_epochs": len(df),
            "best_val_rmse": float(df["val_rmse"].min()),
            "test_rmse": f["test_rmse"],
            "search_s": round(f["search_s"], 1),
            "final_s": round(f["final_s"], 1),
            "best_config": {k: f["best"].config[k] for k in f["searched"]},
        }
        if ref is not None:
            row["epoch_share"] = row["trial_epochs"] / len(ref["df"])
            row["val_gap"] = row["best_val_rmse"] / float(ref["df"]["val_rmse"].min()) - 1
        if rnd is not None and method not in (REFERENCE, RANDOM_ASHA):
            at_budget = best_within(rnd["df"], row["trial_epochs"])
            row["random_asha_at_equal_epochs"] = at_budget
            row["vs_random_asha"] = row["best_val_rmse"] / at_budget - 1
        rows.append(row)
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median and worst case over the seeds, per method (worst = largest share, gap and test RMSE)."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]
        s: dict[str, Any] = {"method": method, "seeds": len(rs)}
        for key in ("epoch_share", "val_gap", "test_rmse", "best_val_rmse", "trial_epochs"):
            vals = [r[key] for r in rs if key in r and r[key] is not None and math.isfinite(r[key])]
            if vals:
                s[f"{key}_median"], s[f"{key}_worst"] = statistics.median(vals), max(vals)
        diffs = [r["vs_random_asha"] for r in rs if "vs_random_asha" in r]
        if diffs:
            s["beats_random_asha_seeds"] = sum(d < 0 for d in diffs)
            s["vs_random_asha_median"] = statistics.median(diffs)
        out.append(s)
    return out


def target_lines(summary: list[dict[str, Any]]) -> list[str]:
    lines = []
    for s in summary:
        if s["method"] in (REFERENCE, RANDOM_ASHA) or "epoch_share_median" not in s:
            continue
        checks = [
            ("trial-epochs share, median <= 40 %", s["epoch_share_median"] <= 0.40),
            ("best-val gap, median <= 2 %", s["val_gap_median"] <= 0.02),
            ("best-val gap, worst <= 5 %", s["val_gap_worst"] <= 0.05),
        ]
        if "vs_random_asha_median" in s:
            checks.append(("beats random + ASHA at equal trial-epochs, median", s["vs_random_asha_median"] < 0))
        lines.append(f"- {s['method']}: " + "; ".join(f"{c}: {'met' if ok else 'MISSED'}" for c, ok in checks))
    return lines


def pct(v: Any) -> str:
    return "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{100 * v:+.1f} %"


def markdown(rows: list[dict[str, Any]], summary: list[dict[str, Any]], header: str) -> str:
    per_seed = [
        "| seed | method | trials | trial-epochs | share of random_full | best val RMSE | gap to random_full "
        "| random + ASHA best at equal trial-epochs | test RMSE (retrained) | search s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        share = f"{100 * r['epoch_share']:.1f} %" if "epoch_share" in r else ""
        rnd = r.get("random_asha_at_equal_epochs")
        rnd_text = "" if rnd is None else f"{rnd:.2f} ({pct(r['vs_random_asha'])})"
        per_seed.append(
            f"| {r['seed']} | {r['method']} | {r['trials']} | {r['trial_epochs']} | {share} "
            f"| {r['best_val_rmse']:.2f} | {pct(r.get('val_gap')) if r['method'] != REFERENCE else ''} "
            f"| {rnd_text} | {r['test_rmse']:.2f} "
            f"| {r['search_s']:.0f} |"
        )
    over = [
        "| method | seeds | trial-epochs share, median / worst | best-val gap, median / worst "
        "| test RMSE, median / worst | beats random + ASHA at equal trial-epochs (seeds; median difference) |",
        "|---|---|---|---|---|---|",
    ]
    for s in summary:
        share = (
            f"{100 * s['epoch_share_median']:.1f} % / {100 * s['epoch_share_worst']:.1f} %"
            if "epoch_share_median" in s
            else ""
        )
        gap = f"{pct(s['val_gap_median'])} / {pct(s['val_gap_worst'])}" if "val_gap_median" in s else ""
        test = f"{s['test_rmse_median']:.2f} / {s['test_rmse_worst']:.2f}" if "test_rmse_median" in s else ""
        beats = (
            f"{s['beats_random_asha_seeds']} of {s['seeds']}; {pct(s['vs_random_asha_median'])}"
            if "vs_random_asha_median" in s
            else ""
        )
        over.append(f"| {s['method']} | {s['seeds']} | {share} | {gap} | {test} | {beats} |")
    return "\n".join([header, "", *per_seed, "", *over, "", *target_lines(summary)])


# -- main ---------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--space", default=str(REPO / "search_spaces" / "demo.yaml"))
    p.add_argument("--seeds", default="0,1,2,3,4", help="searcher (and training) seeds, comma-separated")
    p.add_argument("--methods", help="comma-separated (default: the three built-in ones and every variant)")
    p.add_argument("--variant", action="append", default=[], help="NAME:SECTION.KEY=VALUE (repeatable)")
    p.add_argument("--set", action="append", default=[], help="SECTION.KEY=VALUE for every method (repeatable)")
    p.add_argument("--num-samples", type=int, help="trials per search (default: the space's)")
    p.add_argument("--input-dir")
    p.add_argument("--label-dir")
    p.add_argument("--out", help="folder for the experiments and retrained models (default: a temporary one)")
    p.add_argument("--json", help="also write the per-seed rows and the summary to this JSON file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    variants = parse_variants(a.variant or DEFAULT_VARIANTS)
    known = [*BUILTIN, *variants]
    methods = a.methods.split(",") if a.methods else known
    if unknown := [m for m in methods if m not in known]:
        raise SystemExit(f"--methods: unknown {', '.join(unknown)}; known: {', '.join(known)}")
    base = load_base(Path(a.space), a.set, a.num_samples)
    for m in methods:  # every space is valid before any search starts
        parse_search_space(method_space(base, m, variants, seeds[0]), source=f"{m} space")
    data = ["--input-dir", a.input_dir, "--label-dir", a.label_dir] if a.input_dir else []
    out = Path(a.out or tempfile.mkdtemp(prefix="search_eff_"))
    out.mkdir(parents=True, exist_ok=True)
    searched = list(base["params"])

    import ray

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    rows: list[dict[str, Any]] = []
    retrained: set[str] = set()
    start = time.perf_counter()
    try:
        for i, seed in enumerate(seeds):
            found: dict[str, dict[str, Any]] = {}
            for m in methods:
                name = run_name(m, seed)
                df, best, secs = run_search(method_space(base, m, variants, seed), name, out, data)
                test, final_s, key = retrain(str(out / "runs" / name), best.config, out)
                shared = key in retrained  # counted once: the methods that found this config share its model
                retrained.add(key)
                final_s = 0.0 if shared else final_s
                print(
                    f"seed {seed} {m}: {len(df)} trial-epochs, best val {df['val_rmse'].min():.3f}, test {test:.3f}"
                    f"{' (the config another method found: same retrained model)' if shared else ''}",
                    flush=True,
                )
                found[m] = {"df": df, "best": best, "search_s": secs, "test_rmse": test, "final_s": final_s}
                found[m]["searched"] = [k for k in searched if k in best.config]
            rows += seed_rows(seed, found)
            done = time.perf_counter() - start
            print(
                f"[{done / 60:.1f} min after {i + 1} of {len(seeds)} seeds; "
                f"about {done / (i + 1) * len(seeds) / 60:.0f} min in all]",
                flush=True,
            )
    finally:
        ray.shutdown()

    summary = summarise(rows)
    sp = parse_search_space(method_space(base, "optuna_asha", variants, seeds[0]), source=a.space).settings
    header = (
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"cuda={torch.cuda.is_available()}. Space {a.space}: {sp['experiment']['num_samples']} trials, "
        f"{sp['experiment']['max_concurrent']} at a time, max_t {sp['scheduler']['max_t']}, grace period "
        f"{sp['scheduler']['grace_period']}, reduction factor {sp['scheduler']['reduction_factor']}. Seeds {a.seeds}. "
        f"Variants: {', '.join(f'{k} ({v})' for k, v in variants.items() if k in methods) or 'none'}. "
        f"Searches and retraining took {sum(r['search_s'] + r['final_s'] for r in rows) / 60:.1f} min "
        f"(this run: {(time.perf_counter() - start) / 60:.1f} min of wall time, reused results included).\n"
        f"Command: `python bench/search_efficiency.py {' '.join(sys.argv[1:] if argv is None else argv)}`"
    )
    print("\n" + markdown(rows, summary, header))
    print(f"\nexperiments and retrained models in {out}")
    if a.json:
        Path(a.json).write_text(
            json.dumps({"header": header, "methods": methods, "rows": rows, "summary": summary}, indent=1, default=str)
        )


if __name__ == "__main__":
    main()
