"""search_spaces/real-cpu.yaml: a valid space of U-Nets large enough for the real tiles, within its CPU budget."""

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
    assert exp["time_budget_s"] is not None and exp["time_budget_s"] + 120 <= 15 * 60  # + Ray's start and wrap-up
    rungs = [sched["grace_period"] * sched["reduction_factor"] ** k for k in range(3)]
    assert [r for r in rungs if r < sched["max_t"]] == [3, 9] and sched["max_t"] == 27
    # The plan of the file's comment: ~200 trial-epochs at 3.5 s (first rung) / 4.5 s (promoted), two at a time,
    # plus ~7 s per trial and ~40 s around the search: under 10 minutes, and the shapes it plans for are the space's.
    assert {(b, d) for b in params["base_channels"].choices for d in (3, 4)} == set(PLANNED_S)
    n = exp["num_samples"]
    first = n * rungs[0]
    promoted = n / 3 * (rungs[1] - rungs[0]) * 1.25 + n / 9 * (sched["max_t"] - rungs[1]) * 1.25
    mean_s = sum(PLANNED_S.values()) / len(PLANNED_S)
    wall = (first * mean_s + promoted * 4.5 + 7 * n) / exp["max_concurrent"] + 40
    assert wall < 10 * 60, wall


def test_real_cpu_space_says_how_its_final_model_is_built() -> None:
    """The recommended recipe is in the file: its final: section (top 3 distinct configurations, one seed each,
    sigma scaled on val and widened with the distance from the train pixels), so the header's final_train command
    needs no flags."""
    space = load_search_space(SPACE)
    assert space.final == {"ensemble_top": 3, "ensemble": 1, "calibration": "distance"}
    assert space.final["ensemble_top"] <= space.settings["experiment"]["num_samples"]
    header = [ln for ln in SPACE.read_text().splitlines() if ln.startswith("#")]
    final_cmd = [ln for ln in header if "python -m tune_agb.final_train" in ln]
    assert final_cmd == ["#   python -m tune_agb.final_train --experiment ray_results/real-cpu"]
