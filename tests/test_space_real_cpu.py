"""search_spaces/real-cpu.yaml: a valid space of U-Nets large enough for the real tiles, selected on spatial folds,
within its CPU budget."""

from __future__ import annotations

from pathlib import Path

from tune_agb.search.space import load_search_space

SPACE = Path(__file__).resolve().parents[1] / "search_spaces" / "real-cpu.yaml"
# Seconds per epoch on the real tiles, 1 thread (the file's planned figures), by (base_channels, depth).
PLANNED_S = {(16, 3): 1.4, (16, 4): 1.6, (24, 3): 2.6, (24, 4): 3.5, (32, 3): 5.0, (32, 4): 6.9}


def test_real_cpu_space_sizes_its_unets_and_its_budget() -> None:
    space = load_search_space(SPACE)
    params = {p.name: p for p in space.params}
    assert min(params["base_channels"].choices) >= 16
    assert (params["depth"].low, params["depth"].high) == (3, 4)
    exp, sched, res = space.settings["experiment"], space.settings["scheduler"], space.settings["resources"]
    assert exp["max_concurrent"] * res["cpu"] <= 2 and res["gpu"] == 0
    # The search stops new epochs at its budget; with Ray's start and wrap-up it leaves 10 of issue 31's 30 minutes
    # for the final model (measured 1.3-4.4 minutes).
    assert exp["time_budget_s"] is not None and exp["time_budget_s"] + 120 <= 20 * 60
    rungs = [sched["grace_period"] * sched["reduction_factor"] ** k for k in range(3)]
    assert [r for r in rungs if r < sched["max_t"]] == [3, 9] and sched["max_t"] == 27
    # Every trial is validated on spatial folds of the train+val tiles.
    assert space.cv is not None and space.cv["k"] == 3 and space.cv["block_size"] == 2
    # The plan of the file's comment: each trial-epoch trains k fold models on (k-1)/k of region A's 15 train+val
    # tiles (2.5 epochs of the 12-tile table); ~95 trial-epochs at 3.5 s (first rung) / 4.5 s (promoted) per table
    # epoch, two at a time, plus ~10 s per trial and ~40 s around the search: about 10 minutes, and the shapes it
    # plans for are the space's.
    assert {(b, d) for b in params["base_channels"].choices for d in (3, 4)} == set(PLANNED_S)
    k, n = space.cv["k"], exp["num_samples"]
    per_trial_epoch = k * (15 * (k - 1) / k) / 12
    first = n * rungs[0]
    promoted = n / 3 * (rungs[1] - rungs[0]) * 1.25 + n / 9 * (sched["max_t"] - rungs[1]) * 1.25
    mean_s = sum(PLANNED_S.values()) / len(PLANNED_S)
    wall = ((first * mean_s + promoted * 4.5) * per_trial_epoch + 10 * n) / exp["max_concurrent"] + 40
    assert 8 * 60 < wall < 12 * 60, wall


def test_real_cpu_space_says_how_its_final_model_is_built() -> None:
    """The recommended recipe is in the file: its final: section (top 3 distinct configurations, one seed each,
    sigma scaled on the out-of-fold pixels and widened with the distance from the train pixels), so the header's
    final_train command needs no flags."""
    space = load_search_space(SPACE)
    assert space.final == {"ensemble_top": 3, "ensemble": 1, "calibration": "distance", "forest": 0.5}
    assert space.final["ensemble_top"] <= space.settings["experiment"]["num_samples"]
    header = [ln for ln in SPACE.read_text().splitlines() if ln.startswith("#")]
    final_cmd = [ln for ln in header if "python -m tune_agb.final_train" in ln]
    assert final_cmd == ["#   python -m tune_agb.final_train --experiment ray_results/real-cpu"]
