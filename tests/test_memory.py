"""The memory-fit check (tune_agb.engine.memory) and how an infeasible trial shows in the results.

The dry step itself needs a CUDA device: tests/test_cuda.py runs it for real. Here it is replaced by a given peak
(the one GPU-bound piece, mocked because this machine has no GPU), to check the arithmetic and the decision.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from tests.search_helpers import tiny_space
from tune_agb.engine.config import TrainConfig
from tune_agb.engine.data import choose_mode
from tune_agb.engine.memory import HEADROOM, GiB, check_memory_fit
from tune_agb.engine.model import UNet
from tune_agb.errors import InfeasibleError
from tune_agb.search.results import infeasible_lines, results_frame, summary
from tune_agb.search.space import METRICS, parse_search_space
from tune_agb.search.trainable import infeasible_result

CUDA = torch.device("cuda")  # never touched: total_memory and measure are given


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"base_channels": 8, "depth": 2, "batch_size": 4, **kw})


def test_off_cuda_nothing_is_measured() -> None:
    def boom(*_):
        raise AssertionError("measured on the CPU")

    assert check_memory_fit(_cfg(), (32, 32), torch.device("cpu"), 0.25, measure=boom) is None


def test_fit_adds_optimizer_state_and_batches_to_the_measured_step() -> None:
    cfg = _cfg(optimizer="adamw")
    n_params = sum(p.numel() for p in UNet.from_config(cfg).parameters())
    fit = check_memory_fit(cfg, (32, 48), CUDA, 0.25, total_memory=8 * GiB, measure=lambda *_: 100 * 2**20)
    assert fit is not None and fit.fits
    assert fit.available == 2 * GiB
    assert fit.step_peak == 100 * 2**20
    assert fit.optimizer_state == 2 * 4 * n_params  # two float32 moments per weight
    assert fit.batches == 3 * 4 * 15 * 32 * 48 * 4  # (prefetch 2 + 1) batches of 14 bands + the label, float32
    assert fit.required == fit.step_peak + fit.optimizer_state + fit.batches
    sgd = check_memory_fit(_cfg(optimizer="sgd"), (32, 48), CUDA, 0.25, total_memory=8 * GiB, measure=lambda *_: 0)
    assert sgd is not None and sgd.optimizer_state == 4 * n_params


def test_a_step_beyond_the_share_is_infeasible_with_its_figures() -> None:
    share = 0.25 * 8 * GiB
    over = int(HEADROOM * share)  # with the optimiser state and batches on top, just over the limit
    with pytest.raises(InfeasibleError) as info:
        check_memory_fit(_cfg(batch_size=32), (244, 244), CUDA, 0.25, total_memory=8 * GiB, measure=lambda *_: over)
    err = info.value
    assert err.reason.startswith("infeasible: needs ") and "batch_size 32" in err.reason and "244x244" in err.reason
    assert "2.00 GiB" in err.reason  # the share
    assert err.available == share and err.required is not None and err.required > HEADROOM * share
    # Just under: fits.
    under = int(HEADROOM * share) - 50 * 2**20
    assert check_memory_fit(_cfg(), (32, 32), CUDA, 0.25, total_memory=8 * GiB, measure=lambda *_: under)


def test_a_dry_step_that_runs_out_of_memory_is_infeasible() -> None:
    def oom(*_):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    with pytest.raises(InfeasibleError, match=r"ran out of memory within its GPU share of 2\.00 GiB"):
        check_memory_fit(_cfg(batch_size=512), (244, 244), CUDA, 0.25, total_memory=8 * GiB, measure=oom)


def test_resident_only_where_the_working_set_leaves_room() -> None:
    gib = GiB
    # 0.25 of 16 GiB = 4 GiB: 2 GiB of tiles are within 60 % of it...
    assert choose_mode("auto", 2 * gib, CUDA, 0.25, total_memory=16 * gib) == "resident"
    # ...but not once the measured working set takes 3 GiB of the 4.
    assert choose_mode("auto", 2 * gib, CUDA, 0.25, total_memory=16 * gib, reserved=3 * gib) == "stream"
    assert choose_mode("auto", 1 * gib, CUDA, 0.25, total_memory=16 * gib, reserved=3 * gib) == "resident"


def test_infeasible_trial_shows_in_results_and_summary() -> None:
    space = parse_search_space(tiny_space(), source="t")
    reason = "infeasible: needs 41.00 GiB at batch_size 512; its GPU share is 19.50 GiB"
    bad = infeasible_result(reason) | {"trial_id": "bad", "wall_time": 2.0, "config": {"lr": 0.01}}
    assert bad["epoch"] == 1 and all(bad[m] == math.inf for m in METRICS)
    good = {"trial_id": "good", "epoch": 1, "val_rmse": 3.0, "wall_time": 1.0, "gpu_mem_peak_gb": 1.5,
            "config": {"lr": 0.003}}  # fmt: skip
    df = results_frame([good, bad], space)
    assert list(df.loc[df.trial_id == "bad", "infeasible"]) == [reason]
    assert pd.isna(df.loc[df.trial_id == "good", "infeasible"]).all()
    assert float(df.loc[df.trial_id == "good", "gpu_mem_peak_gb"].iloc[0]) == 1.5
    assert infeasible_lines(df) == [f"trial bad {reason}"]
    text = summary(df, space)
    assert text.splitlines()[-1] == f"trial bad {reason}"
    assert infeasible_lines(results_frame([good], space)) == []
