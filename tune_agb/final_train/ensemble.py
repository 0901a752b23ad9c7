"""The ensemble maths of a final run: members combined into one predictive distribution (each weighted at each pixel
by its bounded precision, :func:`~tune_agb.engine.inference.combine_members`), the out-of-fold prediction of a
cross-validated search's fold models combined the same way, and the loss an ensemble is scored and calibrated
under."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from tune_agb.cv import OutOfFold, out_of_fold
from tune_agb.engine.calibration import pixel_bands
from tune_agb.engine.config import TrainConfig
from tune_agb.engine.data import TileSet
from tune_agb.engine.inference import combine_members
from tune_agb.engine.train import SplitEval
from tune_agb.errors import TuneAgbError
from tune_agb.final_train.plan import Plan
from tune_agb.runs import Prediction

log = logging.getLogger("tune_agb.final_train")


def combined(evals: list[SplitEval]) -> Prediction:
    """The members' predictions of one split combined, weighted by their bounded precision
    (:func:`~tune_agb.engine.inference.combine_members`), on the host. Every member predicted the same pixels in the
    same order."""

    def host(t: torch.Tensor) -> np.ndarray:
        return t.float().cpu().numpy()

    for e in evals[1:]:
        if not (np.array_equal(e.tile, evals[0].tile) and np.array_equal(e.flat, evals[0].flat)):
            raise RuntimeError("ensemble members predicted different pixels; they cannot be combined")
    mean, var = combine_members(torch.stack([e.mean for e in evals]), torch.stack([e.var for e in evals]))
    maps = {}
    for k in evals[0].maps:
        m, v = combine_members(torch.stack([e.maps[k][0] for e in evals]), torch.stack([e.maps[k][1] for e in evals]))
        maps[k] = (host(m), host(v))
    return Prediction(evals[0].tile, evals[0].flat, host(evals[0].y), host(mean), host(var), maps)


def ensemble_loss(cfgs: list[TrainConfig]) -> str:
    """The loss under which an ensemble's predictive distribution is scored and calibrated: the members' loss when
    they share one, else Gaussian (the total variance is a mixture's, whatever each member's distribution)."""
    losses = {c.loss for c in cfgs}
    if len(losses) == 1:
        return losses.pop()
    log.info("members were trained with different losses (%s): the ensemble is scored as Gaussian", sorted(losses))
    return "gaussian_nll"


def cv_fold_states(plan: Plan) -> list[list[dict[str, Any]]] | None:
    """The k fold models behind a run from a cross-validated search, per configuration: of the best trial and epoch,
    or (``ensemble_top``) of each member's trial at its best epoch. None: not a cv search, or a retrain whose fold
    models Ray did not keep (it then calibrates on val, with a warning)."""
    if plan.cv is None:
        return None
    sources = [plan.cv]
    if plan.kind == "configs":  # one set of fold models per configuration, however many seeds it is trained with
        trials = list({mp.trial.trial_id: mp.trial for mp in plan.members}.values())
        sources = [replace(plan.cv, trial_id=t.trial_id, epoch=t.epoch, checkpoint=t.checkpoint) for t in trials]
    try:
        return [src.fold_states() for src in sources]
    except TuneAgbError as exc:
        if plan.cv_final == "folds":
            raise
        log.warning("%s", exc)
        return None


def ensemble_out_of_fold(
    per_config: list[list[dict[str, Any]]], tiles: dict[str, TileSet], plan: Plan, device: str
) -> OutOfFold:
    """The out-of-fold prediction of the run: each labelled train/val pixel predicted by the fold model(s) that
    validated on it, combined over the configurations like the members
    (:func:`~tune_agb.engine.inference.combine_members`), with where each pixel is (``tile``, ``flat``)."""
    oofs = [out_of_fold(states, tiles, plan.cv.folds, device=device) for states in per_config]
    first = oofs[0]
    if any(not (np.array_equal(o.tile, first.tile) and np.array_equal(o.flat, first.flat)) for o in oofs[1:]):
        raise RuntimeError("out-of-fold predictions of the configurations cover different pixels")
    means, varis = (torch.from_numpy(np.stack([getattr(o, a) for o in oofs])) for a in ("mean", "var"))
    mean, var = combine_members(means, varis)
    return replace(first, mean=mean.numpy(), var=var.numpy())


def out_of_fold_bands(oof: OutOfFold, tiles: TileSet) -> np.ndarray:
    """The input bands (C, pixels) of the out-of-fold pixels, in their order, from ``tiles``: the train and val
    tiles stacked (:func:`tune_agb.cv.merge_train_val`), which hold every tile the fold models validated on."""
    row = {name: i for i, name in enumerate(tiles.names)}
    return pixel_bands(tiles.inputs, np.array([row[str(t)] for t in oof.tile], dtype=np.int64), oof.flat)
