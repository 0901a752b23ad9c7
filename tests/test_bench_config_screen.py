"""bench/config_screen.py: variants of one configuration trained on the outer spatial folds of the real tiles."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import config_screen as cs
import real_selection as rs


def test_base_config_is_the_spaces_first_point_for_max_t_epochs() -> None:
    space = yaml.safe_load((Path(cs.ROOT) / "search_spaces" / "real-cpu.yaml").read_text())
    base = cs.base_config(space)
    assert base["epochs"] == space["scheduler"]["max_t"]
    assert {k: base[k] for k in space["fixed"]} == space["fixed"]
    point = space["searcher"]["points_to_evaluate"][0]
    assert {k: base[k] for k in point} == point
    assert cs.parse_variant("b:dropout=0.5,loss=laplacian_nll") == ("b", {"dropout": 0.5, "loss": "laplacian_nll"})
    # a value may hold commas (a new item starts only before KEY=); 1e-3 is a number, not YAML 1.1's string
    assert cs.parse_variant("t:init_weights=/a,b.pt,lr=1e-3") == ("t", {"init_weights": "/a,b.pt", "lr": 0.001})
    for bad in ("nocolon", ":lr=1", "x:lr"):
        with pytest.raises(SystemExit, match="--variant"):
            cs.parse_variant(bad)


def test_a_bad_variant_stops_before_anything_trains(tmp_path: Path, real_data: Path) -> None:
    with pytest.raises(SystemExit, match="'dropout' must be in \\[0, 1\\)"):
        cs.main(["--data", str(real_data), "--variant", "x:dropout=3", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o" / "runs").exists()


@pytest.mark.slow
def test_screen_pools_every_label_of_the_real_tiles_per_variant_and_seed(tmp_path: Path, real_data: Path) -> None:
    space = {"fixed": {"batch_size": 4, "base_channels": 4, "depth": 2}, "scheduler": {"max_t": 1}}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    out, js = tmp_path / "o", tmp_path / "r.json"
    argv = ["--data", str(real_data), "--outer-k", "2", "--seeds", "0", "--space", str(tmp_path / "space.yaml"),
            "--variant", "drop:dropout=0.3", "--out", str(out), "--json", str(js)]  # fmt: skip
    cs.main(argv)
    got = json.loads(js.read_text())
    labels = sum(rs.tile_labels(real_data).values())
    assert [r["test_n"] for r in got["rows"]] == [labels, labels]  # both folds' test pixels, every label once
    assert [s["variant"] for s in got["summary"]] == ["plain", "drop"]
    plain, drop = (yaml.safe_load((out / "configs" / f"{n}.yaml").read_text()) for n in ("plain", "drop"))
    assert drop == {**plain, "dropout": 0.3} and plain["epochs"] == 1 and plain["base_channels"] == 4
    assert got["rows"][0]["test_rmse"] != got["rows"][1]["test_rmse"]  # the variant trained differently
    # a rerun reads the finished runs back instead of training again
    stamp = (out / "runs" / "plain" / "s0_f0" / "metrics.json").stat().st_mtime_ns
    cs.main(argv)
    assert (out / "runs" / "plain" / "s0_f0" / "metrics.json").stat().st_mtime_ns == stamp
    assert json.loads(js.read_text())["rows"] == got["rows"]
