"""Issue 30: the figures of a ``bench/gpu_scale.py search`` run, from its samples and the trials' results.

``gpu_summary`` (GPU utilisation and memory), ``rss_per_trial`` (RssAnon per trial and process), ``epoch_summary``
(epochs, seconds per epoch, the compute bound from ``flops``), ``trial_statuses``, ``continued_trials`` (the trials
that reported on both sides of the kill), ``best_summary`` and ``print_summary``; ``bench/gpu_scale.py``'s docstring
says what each figure of ``summary.json`` means.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tune_agb.bands import BAND_NAMES  # noqa: E402

if TYPE_CHECKING:
    from gpu_scale import Sampler


def flops(base: int, depth: int, tile: int) -> tuple[float, float]:
    """FLOPs per sample of the U-Net (base, depth) at ``tile`` px: (forward + backward, forward only)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(REPO / "bench"))
    from train_throughput import count_flops_per_sample

    from tune_agb.engine.config import TrainConfig
    from tune_agb.engine.model import UNet

    cfg = TrainConfig(base_channels=base, depth=depth)
    fb = count_flops_per_sample(cfg, tile)
    model = UNet.from_config(cfg).to("meta").eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(2, len(BAND_NAMES), tile, tile, device="meta"))
    return fb, counter.get_total_flops() / 2


def gpu_summary(s: Sampler) -> dict[str, Any]:
    if not s.smi:
        return {"nvidia_smi": False}
    if not s.gpu:
        return {"nvidia_smi": True, "samples": 0}
    per_t: dict[float, list[tuple[str, float, float]]] = {}
    for t, phase, _, util, mem in s.gpu:
        per_t.setdefault(t, []).append((phase, util, mem))
    rows = [(t, v[0][0], float(np.mean([u for _, u, _ in v])), float(np.sum([m for _, _, m in v]))) for t, v in
            sorted(per_t.items())]  # fmt: skip
    bins: dict[int, list[tuple[str, float, float]]] = {}
    for t, phase, util, mem in rows:
        bins.setdefault(int(t // 10), []).append((phase, util, mem))
    phases = sorted({r[1] for r in rows})
    return {
        "nvidia_smi": True,
        "samples": len(rows),
        "util_mean_pct": float(np.mean([r[2] for r in rows])),
        "util_mean_pct_by_phase": {p: float(np.mean([r[2] for r in rows if r[1] == p])) for p in phases},
        "mem_used_max_mib": float(max(r[3] for r in rows)),
        "bins_10s": [
            {
                "t_s": 10 * b,
                "phase": v[-1][0],
                "util_pct": round(float(np.mean([u for _, u, _ in v])), 1),
                "mem_mib": round(float(np.mean([m for _, _, m in v]))),
            }
            for b, v in sorted(bins.items())
        ],
    }


def rss_per_trial(s: Sampler, df: Any) -> dict[str, Any]:
    """Per trial and process (``pid`` of its reports): RssAnon over the process's time on the trial."""
    samples: dict[int, list[tuple[float, float, str]]] = {}
    for wall, _, pid, rss, title in s.rss:
        samples.setdefault(pid, []).append((wall, rss, title))
    # Which trial had a process when: reports sorted by time; a process may serve several trials (reused actors).
    spans: list[tuple[int, str, float, float]] = []  # pid, trial, first report, last report
    for (pid, trial), g in df.dropna(subset=["pid"]).groupby(["pid", "trial_id"]):
        spans.append((int(pid), str(trial), float(g["wall_time"].min()), float(g["wall_time"].max())))
    out: dict[str, Any] = {}
    for pid, trial, first, last in sorted(spans, key=lambda v: (v[0], v[2])):
        before = [sp[3] for sp in spans if sp[0] == pid and sp[3] < first]
        start = max(before) if before else -math.inf
        window = [(w, r, t) for w, r, t in samples.get(pid, []) if start < w <= last + 1.5]
        if not window:
            out.setdefault(trial, []).append({"pid": pid, "samples": 0})
            continue
        after_first = [(w, r) for w, r, _ in window if w >= first - 1.5]
        at_first = after_first[0][1] if after_first else window[-1][1]
        peak_after = max((r for _, r in after_first), default=at_first)
        out.setdefault(trial, []).append(
            {
                "pid": pid,
                "title": window[-1][2],
                "samples": len(window),
                "rss_first_sample_mb": round(window[0][1], 1),
                "rss_at_first_report_mb": round(at_first, 1),
                "rss_last_mb": round(window[-1][1], 1),
                "rss_max_mb": round(max(r for _, r, _ in window), 1),
                "growth_mb": round(peak_after - at_first, 1),
                "startup_to_first_epoch_s": round(first - window[0][0], 1),
            }
        )
    growth = [p["growth_mb"] for v in out.values() for p in v if "growth_mb" in p]
    drivers = [r for _, _, _, r, t in s.rss if t == "driver"]
    return {
        "trials": out,
        "max_growth_mb": max(growth) if growth else None,
        "flat": bool(growth) and max(growth) < 256,
        "flat_rule": "every trial process: max RssAnon after its first report - at its first report < 256 MB",
        "driver_rss_max_mb": round(max(drivers), 1) if drivers else None,
        "ray_processes_seen": len(samples),
    }


def epoch_summary(df: Any, a: argparse.Namespace, manifest: dict[str, Any]) -> dict[str, Any]:
    """Epochs per trial, seconds per epoch between consecutive reports of one process, and the compute bound."""
    tile = manifest["tile"]
    n_train, n_val = manifest["splits"]["train"]["n"], manifest["splits"]["val"]["n"]
    per_trial: dict[str, Any] = {}
    by_base: dict[int, list[float]] = {}
    for trial, g in df.sort_values(["trial_id", "epoch"]).groupby("trial_id"):
        secs = []
        rows = list(g.itertuples())
        for prev, cur in itertools.pairwise(rows):
            if cur.epoch == prev.epoch + 1 and cur.pid == prev.pid:
                secs.append(float(cur.wall_time - prev.wall_time))
        base = int(g["config/base_channels"].iloc[0])
        batch = int(g["config/batch_size"].iloc[0])
        by_base.setdefault(base, []).extend(secs)
        per_trial[str(trial)] = {
            "epochs": int(g["epoch"].max()),
            "reports": len(g),
            "processes": int(g["pid"].nunique()),
            "base_channels": base,
            "batch_size": batch,
            "lr": float(g["config/lr"].iloc[0]),
            "epoch_s": [round(v, 2) for v in secs],
            "epoch_s_median": round(float(np.median(secs)), 2) if secs else None,
            "val_rmse_first": float(g["val_rmse"].iloc[0]),
            "val_rmse_best": float(g["val_rmse"].min()),
            "gpu_mem_peak_gb": float(g["gpu_mem_peak_gb"].max()) if g["gpu_mem_peak_gb"].notna().any() else None,
            "infeasible": next((v for v in g["infeasible"] if isinstance(v, str) and v), None),
        }
    peak = a.peak_tflops if a.gpus_per_trial > 0 else None
    bound: dict[str, Any] = {"peak_tflops": peak, "train_tiles": n_train, "val_tiles": n_val}
    for base in sorted({v["base_channels"] for v in per_trial.values()} | set(a.base_channels)):
        try:
            fb, fwd = flops(base, a.depth, tile)
        except Exception as exc:  # the FLOP count is a figure of the report, not a step to fail on
            bound[f"base_{base}"] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        entry: dict[str, Any] = {"flops_fwd_bwd_per_sample": fb, "flops_fwd_per_sample": fwd}
        for batch in a.batch_sizes:
            samples = a.steps_per_epoch * batch if a.steps_per_epoch else n_train
            epoch_flops = fb * samples + fwd * n_val
            e: dict[str, Any] = {"samples_per_epoch": samples, "epoch_tflop": epoch_flops / 1e12}
            if peak:
                e["bound_s_whole_card"] = epoch_flops / (peak * 1e12)
                e["bound_s_at_share"] = e["bound_s_whole_card"] / min(1.0, a.gpus_per_trial)
            entry[f"batch_{batch}"] = e
        measured = by_base.get(base) or []
        if measured:
            entry["epoch_s_median"] = float(np.median(measured))
            if peak:
                shares = [
                    entry[f"batch_{v['batch_size']}"]["bound_s_at_share"] / v["epoch_s_median"]
                    for v in per_trial.values()
                    if v["base_channels"] == base and v["epoch_s_median"] and f"batch_{v['batch_size']}" in entry
                ]
                entry["share_of_peak_at_share_median"] = float(np.median(shares)) if shares else None
        bound[f"base_{base}"] = entry
    all_secs = [s for v in by_base.values() for s in v]
    return {
        "per_trial": per_trial,
        "trial_epochs": len(df),
        "epoch_s_median": float(np.median(all_secs)) if all_secs else None,
        "compute_bound": bound,
    }


def trial_statuses(exp: Path) -> dict[str, str] | str:
    try:
        from ray.tune import ExperimentAnalysis

        return {t.trial_id: t.status for t in ExperimentAnalysis(str(exp)).trials}
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def continued_trials(df: Any, kill_wall: float | None) -> dict[str, Any]:
    """The trials that reported both before and after the kill: their last epoch before it, first after it."""
    if kill_wall is None or df is None or not len(df):
        return {}
    out = {}
    for trial, g in df.groupby("trial_id"):
        before, after = g[g["wall_time"] < kill_wall], g[g["wall_time"] >= kill_wall]
        if len(before) and len(after):
            out[str(trial)] = {
                "last_epoch_before": int(before["epoch"].max()),
                "first_epoch_after": int(after["epoch"].min()),
            }
    return out


def print_summary(s: dict[str, Any], out: Path) -> None:
    r, g, e, m = s.get("resume", {}), s.get("gpu", {}), s.get("epochs", {}), s.get("rss", {})
    lines = [
        "",
        "gpu_scale search summary",
        f"- data: {s.get('data')}",
        f"- kill + resume: killed {r.get('killed')} at {r.get('kill_at_s')} s ({r.get('reports_before_kill')} "
        f"reports), first exit {r.get('first_rc')}, resume exit {r.get('resume_rc')} after {r.get('resume_s')} s, "
        f"all {r.get('num_samples')} trials finished: {r.get('all_trials_finished')}"
        + (f", budget ran out in {r['budget_exhausted']}" if "budget_exhausted" in r else "")
        + f"; continued across the kill: {r.get('continued_across_kill')}",
        f"- GPU: mean utilisation {g.get('util_mean_pct')} % by phase {g.get('util_mean_pct_by_phase')}, "
        f"max memory {g.get('mem_used_max_mib')} MiB"
        if g.get("samples")
        else f"- GPU: {g or 'not sampled'}",
    ]
    if g.get("bins_10s"):
        lines.append("  per 10 s: " + " ".join(f"{b['util_pct']:.0f}" for b in g["bins_10s"]))
    if m:
        lines.append(f"- RssAnon: max growth after a first report {m.get('max_growth_mb')} MB (flat: {m.get('flat')})")
        for trial, procs in m.get("trials", {}).items():
            for p in procs:
                if p.get("samples"):
                    lines.append(
                        f"  {trial} pid {p['pid']}: first {p['rss_first_sample_mb']} MB, at its 1st report "
                        f"{p['rss_at_first_report_mb']}, last {p['rss_last_mb']}, max {p['rss_max_mb']}, "
                        f"growth {p['growth_mb']} MB"
                    )
    if e:
        median = e.get("epoch_s_median")
        median = median if median is None else round(median, 2)
        lines.append(
            f"- epochs: {e.get('trial_epochs')} trial-epochs, median {median} s per epoch (between consecutive "
            "reports of one process)"
        )
        for trial, v in e.get("per_trial", {}).items():
            lines.append(
                f"  {trial}: {v['epochs']} epochs, base {v['base_channels']} batch {v['batch_size']}, epoch s "
                f"{v['epoch_s']}, val_rmse {v['val_rmse_first']:.2f} -> {v['val_rmse_best']:.2f}"
            )
        for k, v in e.get("compute_bound", {}).items():
            if k.startswith("base_") and "flops_fwd_bwd_per_sample" in v:
                batches = {b: x for b, x in v.items() if b.startswith("batch_")}
                tflop = {b: round(x["epoch_tflop"], 3) for b, x in batches.items()}
                text = f"  {k}: {v['flops_fwd_bwd_per_sample'] / 1e9:.2f} GFLOP/sample fwd+bwd, {tflop} TFLOP/epoch"
                if e["compute_bound"].get("peak_tflops"):
                    bound = {b: round(x["bound_s_at_share"], 2) for b, x in batches.items()}
                    peak_share = v.get("share_of_peak_at_share_median")
                    text += f"; bound at the trial's share {bound} s; reached {peak_share} of the share's peak"
                measured = v.get("epoch_s_median")
                lines.append(text + f"; measured median {measured if measured is None else round(measured, 2)} s")
    lines.append(f"- best val RMSE: {s.get('best')}")
    if s.get("errors"):
        lines.append(f"- errors: {s['errors']}")
    lines.append(f"- files: {out}/summary.json, gpu_timeline.csv, rss_timeline.csv, search_*.log, gpu_scale.log")
    print("\n".join(lines), flush=True)


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def best_summary(df: Any, space: Any) -> dict[str, Any] | None:
    """The best trial of the results at its best epoch (:func:`tune_agb.runs.rank_trials`, ``space``'s metric and
    mode): its val RMSE, trial, epoch and configuration."""
    from tune_agb.runs import rank_trials

    ranked = rank_trials(df, space) if len(df) else []
    if not ranked or not ranked[0].scored:
        return None
    top = ranked[0]
    row = df[(df["trial_id"].astype(str) == top.trial_id) & (df["epoch"] == top.epoch)].iloc[-1]
    return {
        "val_rmse": float(row["val_rmse"]),
        "trial_id": top.trial_id,
        "epoch": int(top.epoch),
        "config": {p.name: _plain(row[f"config/{p.name}"]) for p in space.params},
    }
