"""The Ray Tune function trainable: a thin adapter between Tune and :func:`tune_agb.train.train`.

Tune gives it the sampled hyperparameters; the tiles arrive once through the object store
(``tune.with_parameters``). Each epoch it reports the engine's metrics with a checkpoint directory holding
``checkpoint.pt`` (the engine's full state), and it resumes from ``tune.get_checkpoint()`` when Tune restores it.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from tune_agb.checkpoint import load_checkpoint, save_checkpoint
from tune_agb.config import config_from_dict
from tune_agb.data import TileSet
from tune_agb.errors import DivergenceError
from tune_agb.train import EpochReport, train

CHECKPOINT_FILE = "checkpoint.pt"
# Every report so far (JSON lines), saved in each checkpoint directory: Ray's own result.json is written in a
# per-session local folder and copied to storage later, so a hard kill can lose or overwrite its rows; the
# checkpoint is uploaded inside tune.report(), so this log survives with it.
RESULTS_LOG = "results.jsonl"


def finite_or_inf(metrics: dict[str, Any]) -> dict[str, Any]:
    """Replace NaN/inf floats by ``inf``: Optuna refuses NaN (the trial would stay RUNNING) but accepts inf."""
    return {k: (math.inf if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


def select_device(gpu_ids: list[Any], gpu_fraction: float, cuda_available: bool) -> tuple[str, float | None]:
    """Pick the trial's device and the share of GPU memory it may use.

    Args:
        gpu_ids: ``ray.get_gpu_ids()`` of the trial (Ray has set ``CUDA_VISIBLE_DEVICES`` to them).
        gpu_fraction: the trial's ``gpu`` resource (0.25 = a quarter of one card).
        cuda_available: ``torch.cuda.is_available()``.

    Returns:
        ``("cuda:0", fraction)`` on a GPU (index 0 of the visible ones), ``("cpu", None)`` otherwise. Ray does not
        isolate GPU memory between trials sharing a card, so the fraction is applied with
        ``torch.cuda.set_per_process_memory_fraction``; None means no cap (a whole card or more).
    """
    if not gpu_ids or gpu_fraction <= 0 or not cuda_available:
        return "cpu", None
    return "cuda:0", (gpu_fraction if gpu_fraction < 1 else None)


def search_trial(
    config: dict[str, Any],
    *,
    tiles: dict[str, TileSet],
    base: dict[str, Any],
    cpus: float = 1,
    gpu_fraction: float = 0,
) -> None:
    """Train one trial's configuration, reporting to Tune after every epoch.

    Args:
        config: the hyperparameters Optuna sampled for this trial.
        tiles: ``train`` and ``val`` TileSets (read-only arrays from the object store).
        base: defaults + fixed hyperparameters, with ``epochs`` = the trial's full budget.
        cpus: CPUs reserved for the trial (torch threads).
        gpu_fraction: GPUs reserved for the trial (0.25 = a quarter of one card).
    """
    cfg = config_from_dict({**base, **config}, source="trial config")
    # Arrays from the object store are read-only; the engine only reads them (it normalises into new tensors).
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    torch.set_num_threads(max(1, int(cpus)))
    device, mem_fraction = select_device(ray.get_gpu_ids(), gpu_fraction, torch.cuda.is_available())
    if mem_fraction is not None:
        torch.cuda.set_per_process_memory_fraction(mem_fraction, 0)
    node_id = ray.get_runtime_context().get_node_id()

    trial_id = tune.get_context().get_trial_id()
    resume, log_rows = None, []
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume = load_checkpoint(Path(d) / CHECKPOINT_FILE)
            if (Path(d) / RESULTS_LOG).is_file():
                log_rows = [json.loads(line) for line in (Path(d) / RESULTS_LOG).read_text().splitlines() if line]
        # the epochs after the checkpoint may have been reported already: they are run again, keep the new ones
        log_rows = [r for r in log_rows if r["epoch"] <= int(resume["epoch"])]

    def on_epoch(report: EpochReport) -> None:
        metrics = finite_or_inf(report.metrics) | {"node_id": node_id, "pid": os.getpid(), "wall_time": time.time()}
        log_rows.append({**metrics, "trial_id": trial_id, "config": dict(config)})
        with tempfile.TemporaryDirectory(prefix="tune_agb_ckpt_") as tmp:
            save_checkpoint(report.state(), Path(tmp) / CHECKPOINT_FILE)
            (Path(tmp) / RESULTS_LOG).write_text("".join(json.dumps(r) + "\n" for r in log_rows))
            # Tune copies the directory to the experiment storage inside report(), so a temporary one is fine.
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))

    try:
        train(cfg, tiles, device=device, resume=resume, on_epoch=on_epoch, progress=False)
    except DivergenceError as exc:
        # Tell the searcher and scheduler (inf, never NaN), then fail so Tune retries from the last checkpoint.
        tune.report(finite_or_inf(exc.metrics) | {"node_id": node_id, "pid": os.getpid(), "wall_time": time.time()})
        raise
