"""final_train end to end on generated tiles: the Python API (run, resolved_config) and the command (--set,
--print-config, the original script's flags), outputs, TensorBoard read back, resume, ensembles of seeds and of a real
search's best distinct configurations (--ensemble-top)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import rasterio
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import tune_agb.final_train as final_train
from tests.ensemble_helpers import precision_mixture
from tests.raster_helpers import write_tif
from tests.search_helpers import ray_local, tiny_space, write_space  # noqa: F401 (fixture)
from tune_agb.engine.checkpoint import load_checkpoint
from tune_agb.engine.data import load_split
from tune_agb.engine.inference import load_predictor
from tune_agb.errors import TuneAgbError, run_cli
from tune_agb.final_train.cli import LEGACY_FLAGS, main
from tune_agb.predict import main as predict_main
from tune_agb.runs import CALIBRATION_FILE, load_calibration, read_metrics, write_results
from tune_agb.search.experiment import Experiment
from tune_agb.search.results import results_frame
from tune_agb.search.space import parse_search_space

SMALL = {"base_channels": 4, "depth": 2, "batch_size": 4, "lr": 3e-3}


def small_config(tmp_path: Path, **extra: object) -> str:
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(SMALL | extra))
    return str(path)


def data_args(d: Path) -> list[str]:
    return ["--input-dir", str(d / "inputs"), "--label-dir", str(d / "labels")]


def run(argv: list[str]) -> int:
    return run_cli(main, argv)


def train_args(tmp_path: Path, data: Path, out: Path, *extra: str, **config: object) -> list[str]:
    """A small CPU run of final_train on ``data`` into ``out``, plus ``extra`` flags."""
    return [
        "--config",
        small_config(tmp_path, **config),
        *data_args(data),
        "--out-dir",
        str(out),
        "--no-progress",
        "--device",
        "cpu",
        *extra,
    ]


def assert_covers_val(scale: float, val: pd.DataFrame, loss: str) -> None:
    """The fitted factor on sigma puts 68.27 % of the val pixels inside the 1-sigma interval of the model's
    distribution: a quantile of |r| / sigma over the val rows (``predictions.parquet``), recomputed here."""
    from tune_agb.engine.calibration import SCALE_LEVEL, interval_halfwidth

    h = interval_halfwidth(SCALE_LEVEL, loss)
    z = np.abs(val.label - val["mean"]).to_numpy() / val.std_uncalibrated.to_numpy()
    assert scale == pytest.approx(np.quantile(z, SCALE_LEVEL) / h, rel=1e-5)
    assert abs(np.mean(z <= scale * h * (1 + 1e-6)) - SCALE_LEVEL) <= 1.0 / z.size


@pytest.mark.slow
def test_outputs_metrics_predictions_and_tensorboard(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = train_args(tmp_path, tiny_data, out, "--epochs", "3")
    assert run(argv) == 0
    printed = capsys.readouterr().out
    for name in (
        "config.yaml",
        "best.pt",
        "last.pt",
        "metrics.json",
        "predictions.parquet",
        "norm_stats.json",
        "plots/test_scatter.png",
        "plots/val_calibration.png",
        "plots/val_reliability.png",
        "plots/test_reliability.png",
        CALIBRATION_FILE,
    ):
        assert (out / name).is_file(), name
    # the seam margin is stored with the model (predict reads it instead of measuring it again)
    best = load_checkpoint(out / "best.pt")
    margin = best["seam_margin"]
    assert isinstance(margin, int) and margin % 2 ** best["config"]["depth"] == 0
    assert load_predictor(out, device="cpu").margin == margin
    for split in ("val", "test"):  # matplotlib PNGs with content (not one colour)
        for kind in ("scatter", "calibration", "reliability"):
            with Image.open(out / "plots" / f"{split}_{kind}.png") as img:
                assert img.format == "PNG" and min(img.size) >= 300
                lo, hi = img.convert("L").getextrema()
                assert hi - lo > 100, f"{split}_{kind}.png is blank"
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["base_channels"] == 4 and cfg["epochs"] == 3  # file and flag both applied
    metrics = json.loads((out / "metrics.json").read_text())
    for key in (
        "val_rmse",
        "val_r2",
        "val_mae",
        "val_me",
        "test_rmse",
        "test_r2",
        "test_mae",
        "test_me",
        "val_rmv",
        "val_within_1sigma",
        "val_within_2sigma",
        "val_uce",
    ):
        assert np.isfinite(metrics[key]), key

    # best.pt is the epoch with the lowest validation RMSE of the history; last.pt the final epoch.
    last = load_checkpoint(out / "last.pt")
    best = load_checkpoint(out / "best.pt")
    rmses = [h["val_rmse"] for h in last["history"]]
    assert last["epoch"] == 3 and len(rmses) == 3
    assert best["epoch"] == int(np.argmin(rmses)) + 1
    assert metrics["best_epoch"] == best["epoch"]
    assert metrics["val_rmse"] == pytest.approx(min(rmses), rel=1e-5)

    # One row per labelled val/test pixel, and the pooled metrics recomputed from the rows agree.
    table = pq.read_table(out / "predictions.parquet").to_pandas()
    assert list(table.columns) == ["split", "tile", "row", "col", "label", "mean", "std", "std_uncalibrated"]
    for split in ("val", "test"):
        tiles = load_split(tiny_data / "inputs", tiny_data / "labels", split)
        rows = table[table.split == split]
        assert len(rows) == tiles.num_labelled == metrics[f"{split}_n"]
        ti = [tiles.names.index(t) for t in rows.tile]
        np.testing.assert_allclose(tiles.labels[ti, rows.row, rows.col], rows.label)
        rmse = float(np.sqrt(np.mean((rows["mean"] - rows.label) ** 2)))
        assert rmse == pytest.approx(metrics[f"{split}_rmse"], rel=1e-4)
        assert (rows["std"] > 0).all()

    # Calibration (default: one factor on sigma), fitted on the val pixels only, applied to val and test.
    cal = load_calibration(out / CALIBRATION_FILE)
    assert (cal.method, cal.split, cal.n) == ("scale", "val", metrics["val_n"])
    assert metrics["calibration"] == cal.to_dict()
    val = table[table.split == "val"]
    assert_covers_val(cal.scale, val, "gaussian_nll")
    np.testing.assert_allclose(table["std"], table.std_uncalibrated * cal.scale, rtol=1e-5)
    before = metrics["uncalibrated"]
    for split in ("val", "test"):
        rows = table[table.split == split]
        r = rows.label - rows["mean"]
        for m, std in ((metrics, rows["std"]), (before, rows.std_uncalibrated)):
            nll = float(np.mean(0.5 * np.log(2 * np.pi * std**2) + 0.5 * (r / std) ** 2))
            assert m[f"{split}_nll"] == pytest.approx(nll, rel=1e-4)
            assert m[f"{split}_within_1sigma"] == pytest.approx(float(np.mean(np.abs(r) <= std)), abs=1.5 / len(r))
        for key in ("rmse", "r2", "mae", "me", "n"):  # the mean is not touched
            assert metrics[f"{split}_{key}"] == pytest.approx(before[f"{split}_{key}"], rel=1e-5)
    assert abs(metrics["val_within_1sigma"] - 0.6827) <= 1.5 / metrics["val_n"]  # the factor's own target
    lines = printed.splitlines()
    assert any(line.startswith(f"calibration: scale: sigma x {cal.scale:.4g}") for line in lines)
    assert [line.split()[:2] for line in lines if line.startswith(("val ", "test "))] == [
        ["val", "before"], ["val", "after"], ["test", "before"], ["test", "after"]
    ]  # fmt: skip

    # test_maps.npz: the most labelled test tiles, whole, agreeing with the per-pixel rows.
    maps = np.load(out / "test_maps.npz")
    test = load_split(tiny_data / "inputs", tiny_data / "labels", "test")
    counts = [int(np.isfinite(test.labels[test.names.index(n)]).sum()) for n in maps["names"]]
    assert counts == sorted(counts, reverse=True) and len(counts) == min(4, len(test))
    assert counts[0] == max(int(np.isfinite(lab).sum()) for lab in test.labels)
    rows = table[(table.split == "test") & (table.tile == maps["names"][0])]
    np.testing.assert_allclose(maps["mean"][0][rows.row, rows.col], rows["mean"], rtol=1e-6)
    np.testing.assert_allclose(maps["std"][0][rows.row, rows.col], rows["std"], rtol=1e-6)
    np.testing.assert_array_equal(
        np.isfinite(maps["label"][0]), np.isfinite(test.labels[test.names.index(maps["names"][0])])
    )
    assert maps["mean"].shape == maps["std"].shape == maps["label"].shape == (len(counts), *test.labels.shape[1:])

    # TensorBoard, read back with tensorboard's own reader.
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    assert [e.step for e in acc.Scalars("val_rmse")] == [1, 2, 3]
    np.testing.assert_allclose([e.value for e in acc.Scalars("val_rmse")], rmses, rtol=1e-5)
    assert {"train_loss", "lr", "val_r2", "val_variance/std_median"} <= set(tags["scalars"])
    assert len(acc.Images("val_prediction/mean_and_std")) == 3
    assert "val_variance/predicted_std" in tags["histograms"]


# For each config key a legacy flag can set: the flag's arguments and the config value they must give.
LEGACY_VALUES: dict[str, tuple[list[str], object]] = {
    "epochs": (["7"], 7),
    "batch_size": (["2"], 2),
    "lr": (["0.002"], 0.002),
    "weight_decay": (["0.0005"], 0.0005),
    "optimizer": (["SGD"], "sgd"),
    "momentum": (["0.8"], 0.8),
    "grad_clip": (["0.5"], 0.5),
    "in_channels": (["13"], 13),
    "amp": ([], "auto"),
    "upsampling": ([], "bilinear"),
    "loss": (["Laplacian"], "laplacian_nll"),
}


def printed_config(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    """``--print-config`` with ``argv``: the YAML it prints, parsed (exit code 0 checked)."""
    assert run(["--print-config", *argv]) == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize(("flag", "set_item"), [
    (["--nb_epoch", "7"], "config.epochs=7"),
    (["--batch_size", "2"], "config.batch_size=2"),
    (["--base_learning_rate", "0.002"], "config.lr=0.002"),
    (["--l2_lambda", "0.0005"], "config.weight_decay=0.0005"),
    (["--optimizer", "SGD"], "config.optimizer=sgd"),
    (["--momentum", "0.8"], "config.momentum=0.8"),
    (["--gradient_clipping", "0.5"], "config.grad_clip=0.5"),
    (["--num_ch", "13"], "config.in_channels=13"),
    (["--amp"], "config.amp=auto"),
    (["--no-amp"], "config.amp=none"),
    (["--bilinear"], "config.upsampling=bilinear"),
    (["--no-bilinear"], "config.upsampling=transpose"),
    (["--loss_key", "Laplacian"], "config.loss=laplacian_nll"),
    (["--loss_key", "l1"], "config.loss=mae"),
    (["--gradient_clipping"], "config.grad_clip=1.0"),
    (["--no-gradient_clipping"], "config.grad_clip=0.0"),
    (["--seed", "4"], "config.seed=4"),
    (["--ensemble", "3"], "final.ensemble=3"),
    (["--calibration", "isotonic"], "final.calibration=isotonic"),
    (["--forest", "0.25"], "final.forest=0.25"),
])  # fmt: skip
def test_a_flag_is_the_set_item_of_its_key(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: list[str], set_item: str
) -> None:
    """Each of the original script's flags (and the newer ones) resolves to the same run as its ``--set`` item, and
    changes the key it names."""
    base = [
        "--config",
        small_config(tmp_path, amp="none", upsampling="transpose", grad_clip=0.3),
        *data_args(tiny_data),
    ]
    by_flag = printed_config(capsys, *base, *flag)
    by_set = printed_config(capsys, *base, "--set", set_item)
    assert by_flag == by_set
    plain = printed_config(capsys, *base)
    path, _, text = set_item.partition("=")
    section, key = path.split(".")
    shown = {"ensemble": "members"}.get(key, key)  # the plan shows the number of members
    assert by_flag[section][shown] == yaml.safe_load(text)
    differs = {k for k in plain["config"] if plain["config"][k] != by_flag["config"][k]}
    differs |= {k for k in plain["final"] if plain["final"][k] != by_flag["final"][k]}
    assert differs <= {key, "kind", "members", "from"}, (differs, key)
    if section == "final":  # --print-config says where the value came from
        assert (plain["final"]["from"][key], by_flag["final"]["from"][key]) == ("default", "flag/--set")


def test_every_legacy_hyperparameter_flag_is_covered() -> None:
    """The table of the original script's flags names an existing TrainConfig key for each one."""
    from tune_agb.engine.config import TrainConfig

    assert set(LEGACY_FLAGS.values()) <= set(TrainConfig().to_dict())


def test_flags_win_over_set_and_set_over_the_config_file(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--config", small_config(tmp_path, lr=0.5), *data_args(tiny_data)]
    assert printed_config(capsys, *base)["config"]["lr"] == 0.5
    assert printed_config(capsys, *base, "--set", "config.lr=0.25")["config"]["lr"] == 0.25
    assert printed_config(capsys, *base, "--set", "config.lr=0.25", "--lr", "0.125")["config"]["lr"] == 0.125
    # the API: the same precedence, and resolved_config is what --print-config prints
    doc = final_train.resolved_config(
        config=small_config(tmp_path, lr=0.5, epochs=9), input_dir=tiny_data / "inputs",
        label_dir=tiny_data / "labels", epochs=3, overrides={"config.lr": 0.25},
    )  # fmt: skip
    assert (doc["config"]["lr"], doc["config"]["epochs"], doc["config"]["base_channels"]) == (0.25, 3, 4)


def test_print_config_applies_overrides_and_writes_nothing(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = [*data_args(tiny_data), "--out-dir", str(out), "--set", "config.lr=0.01", "--set", "final.ensemble=2"]
    assert run(["--print-config", *argv, "--seed", "5"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# python -m tune_agb.final_train --set config.lr=0.01 --set final.ensemble=2")
    doc = yaml.safe_load(text)
    assert doc["config"]["lr"] == 0.01 and doc["config"]["seed"] == 5
    assert (doc["final"]["kind"], doc["final"]["members"], doc["out_dir"]) == ("seeds", 2, str(out))
    assert doc["input_dir"] == str(tiny_data / "inputs")
    # an ensemble: each member's folder and how its config differs from the first member's (the seed here)
    assert doc["members"] == [
        {"folder": "members/member_00", "differences": {}},
        {"folder": "members/member_01", "differences": {"seed": 6}},
    ]
    assert not out.exists()
    # an out dir that holds a run: printed (it would need --overwrite to train), nothing in it touched
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    assert run(["--print-config", *argv]) == 0
    assert [p.name for p in out.iterdir()] == ["metrics.json"] and (out / "metrics.json").read_text() == "{}"


@pytest.mark.parametrize(("item", "message"), [
    ("model.lr=0.1", "--set model.lr: unknown section 'model'; allowed: config, final"),
    ("config.learning_rate=0.1", "--set config.learning_rate: unknown key 'learning_rate'; valid keys: in_channels,"),
    ("config.lr=fast", "--set config.lr: 'lr' must be a number, got 'fast'"),
    ("config.optimizer=adam2", "--set config.optimizer: 'optimizer' must be one of"),
    ("final.members=3", "--set final.members: unknown key 'members'; valid keys: ensemble, ensemble_top, cv_final,"),
    ("final.ensemble=two", "--set final.ensemble: must be an integer, got 'two'"),
    ("final.calibration=platt", "--set final.calibration: must be one of none, scale, isotonic, distance, got 'platt'"),
    ("final.ensemble=0", "--ensemble: must be >= 1, got 0"),
    ("lr=0.1", "--set lr=0.1: expected SECTION.KEY=VALUE"),
])  # fmt: skip
def test_set_errors_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], item: str, message: str
) -> None:
    out = tmp_path / "run"
    for extra in ([], ["--print-config"]):
        assert run(["--set", item, "--out-dir", str(out), *extra]) == 2
        captured = capsys.readouterr()
        err = captured.err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {message}"), err
        assert captured.out == ""
    assert not out.exists()


def test_set_error_through_python_m(tmp_path: Path) -> None:
    """The real entry point: one line on stderr, exit 2, nothing written."""
    proc = subprocess.run(
        [sys.executable, "-m", "tune_agb.final_train", "--set", "config.nope=1", "--out-dir", str(tmp_path / "o")],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and proc.stdout == "" and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: --set config.nope: unknown key 'nope'; valid keys: in_channels, ")
    assert not (tmp_path / "o").exists()


def test_unknown_loss_is_one_line_listing_the_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--print-config", "--loss_key", "huber"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --loss_key: unknown loss 'huber'; allowed: gaussian, ")


def test_api_run_on_the_demo_data_returns_what_it_wrote(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """tune_agb.final_train.run on the demo data (its default): the outcome's metrics are metrics.json's, its summary
    is what the command prints."""
    out = tmp_path / "api"
    outcome = final_train.run(
        config=small_config(tmp_path), out_dir=out, epochs=1, device="cpu", progress=False,
        overrides=["config.base_channels=4", "final.calibration=none"],
    )  # fmt: skip
    assert outcome.out == out and outcome.kind == "single" and outcome.members == []
    assert outcome.metrics == read_metrics(out)
    assert outcome.metrics["epochs"] == 1 and outcome.config.epochs == 1 and outcome.config.base_channels == 4
    assert outcome.calibration.method == "none" == outcome.metrics["calibration"]["method"]
    assert np.isfinite(outcome.metrics["test_rmse"]) and outcome.metrics["test_n"] > 0
    assert yaml.safe_load((out / "config.yaml").read_text()) == outcome.config.to_dict()
    assert str(out) in outcome.summary() and "test" in outcome.summary()
    # the same run again is refused (one line) unless overwrite, and the run is left as it was
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(TuneAgbError, match=f"^{out}: already holds a run"):
        final_train.run(out_dir=out, epochs=1, device="cpu", progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


@pytest.mark.slow
def test_legacy_flags_per_epoch_checkpoints_and_resume(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, keep = tmp_path / "legacy", tmp_path / "all_ckpt"
    argv = [
        "--config",
        small_config(tmp_path),
        "--train_input_data_dir",
        str(tiny_data / "inputs"),
        "--train_label_data_dir",
        str(tiny_data / "labels"),
        "--out_dir",
        str(out),
        "--nb_epoch",
        "2",
        "--batch_size",
        "2",
        "--base_learning_rate",
        "0.002",
        "--l2_lambda",
        "0.0005",
        "--optimizer",
        "SGD",
        "--momentum",
        "0.8",
        "--gradient_clipping",
        "0.5",
        "--no-amp",
        "--no-bilinear",
        "--num_ch",
        "14",
        "--loss_key",
        "Laplacian",
        "--save_checkpoint",
        "--all_checkpoint_dir",
        str(keep),
        "--num_workers",
        "4",
        "--no-progress",
        "--device",
        "cpu",
    ]
    assert run(argv) == 0
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    # Every legacy hyperparameter flag is on the command line (--amp and --bilinear in their --no- form) ...
    assert all(f in argv or f.replace("--", "--no-", 1) in argv for f in LEGACY_FLAGS)
    # ... the run's config.yaml holds the value each one set, and is the config --print-config resolves for them.
    legacy = {"epochs": 2, "batch_size": 2, "lr": 0.002, "weight_decay": 0.0005, "optimizer": "sgd",
              "momentum": 0.8, "grad_clip": 0.5, "in_channels": 14, "amp": "none", "upsampling": "transpose",
              "loss": "laplacian_nll"}  # fmt: skip
    assert set(legacy) == set(LEGACY_FLAGS.values())
    assert {k: cfg[k] for k in legacy} == legacy
    capsys.readouterr()
    assert run(["--print-config", *argv]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["config"] == cfg
    assert sorted(p.name for p in keep.glob("*.pt")) == ["epoch_0001.pt", "epoch_0002.pt"]

    # --train_mode resume continues from a checkpoint: epoch 2 after resuming from epoch 1 reproduces epoch 2 of
    # the uninterrupted run (same schedule, RNG states restored).
    out2 = tmp_path / "resumed"
    argv2 = [
        "--train_mode",
        "resume",
        "--model_weights_path",
        str(keep / "epoch_0001.pt"),
        *data_args(tiny_data),
        "--out-dir",
        str(out2),
        "--no-progress",
        "--device",
        "cpu",
    ]
    assert run(argv2) == 0
    first = load_checkpoint(keep / "epoch_0002.pt")
    resumed = load_checkpoint(out2 / "last.pt")
    assert resumed["epoch"] == 2 and len(resumed["history"]) == 2
    assert resumed["config"]["loss"] == "laplacian_nll"  # the checkpoint's config, not the defaults
    for key in ("train_loss", "val_rmse", "val_r2"):
        assert resumed["history"][1][key] == pytest.approx(first["history"][1][key], rel=1e-5, abs=1e-6)
    # Resuming OUT/last.pt (the default) with more epochs extends the run: the epoch count goes on.
    assert (
        run(
            [
                "--train_mode",
                "resume",
                "--nb_epoch",
                "3",
                *data_args(tiny_data),
                "--out-dir",
                str(out2),
                "--no-progress",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    extended = load_checkpoint(out2 / "last.pt")
    assert extended["epoch"] == 3 and [h["epoch"] for h in extended["history"]] == [1, 2, 3]
    assert extended["history"][:2] == resumed["history"]
    # Laplacian loss: the calibration factor puts 68.27 % of the val pixels inside the Laplacian's 68.27 % interval.
    cal = load_calibration(out2 / CALIBRATION_FILE)
    table = pq.read_table(out2 / "predictions.parquet").to_pandas()
    assert cal.loss == "laplacian_nll"
    assert_covers_val(cal.scale, table[table.split == "val"], "laplacian_nll")

    # Without --train_mode resume the same out dir is refused, and nothing in it changes.
    before = {p.name: p.stat().st_mtime_ns for p in out2.iterdir()}
    assert run([*data_args(tiny_data), "--out-dir", str(out2), "--epochs", "1"]) == 2
    assert {p.name: p.stat().st_mtime_ns for p in out2.iterdir()} == before


@pytest.mark.slow
def test_ensemble_mean_and_total_variance(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "ens"
    argv = train_args(tmp_path, tiny_data, out, "--epochs", "2", "--ensemble", "2", "--seed", "5")
    assert run(argv) == 0
    seeds = [
        yaml.safe_load((out / "members" / f"member_{k:02d}" / "config.yaml").read_text())["seed"] for k in range(2)
    ]
    assert seeds == [5, 6]
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["members"]) == 2 and metrics["ensemble"] == 2
    assert all(np.isfinite(m["test_rmse"]) for m in metrics["members"])

    # The ensemble in predictions.parquet is the members' precision-weighted mixture, recomputed here.
    val = load_split(tiny_data / "inputs", tiny_data / "labels", "val")
    members = [load_predictor(out / "members" / f"member_{k:02d}", "cpu") for k in range(2)]
    outs = [m.predict(val.inputs) for m in members]
    means = np.stack([o[0].numpy() for o in outs]).astype(np.float64)
    varis = np.stack([o[1].numpy() for o in outs]).astype(np.float64) ** 2
    mean, var = precision_mixture(means, varis)
    table = pq.read_table(out / "predictions.parquet").to_pandas()
    rows = table[table.split == "val"]
    ti = np.array([val.names.index(t) for t in rows.tile])
    # (the float32 variances of two evaluations weight the means: agreement to 1e-3, not 1e-4)
    np.testing.assert_allclose(rows["mean"], mean[ti, rows.row, rows.col], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(rows.std_uncalibrated, np.sqrt(var)[ti, rows.row, rows.col], rtol=1e-3, atol=1e-3)
    # The calibration is fitted on the ensemble's val prediction (total variance), not on a member's.
    cal = load_calibration(out / CALIBRATION_FILE)
    assert_covers_val(cal.scale, rows, "gaussian_nll")
    np.testing.assert_allclose(rows["std"], rows.std_uncalibrated * cal.scale, rtol=1e-5)
    assert abs(metrics["val_within_1sigma"] - 0.6827) <= 1.5 / metrics["val_n"]
    # and load_predictor on the ensemble folder gives the same (uncalibrated; predict applies the calibration).
    ens_mean, ens_std = load_predictor(out, "cpu").predict(val.inputs)
    np.testing.assert_allclose(ens_std.numpy(), np.sqrt(var), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(ens_mean.numpy(), mean, rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_experiment_best_yaml(tiny_data: Path, tmp_path: Path) -> None:
    """--experiment reads the search's best.yaml: its config and its data folders."""
    exp = tmp_path / "storage" / "exp"
    exp.mkdir(parents=True)
    best = {
        "trial_id": "abc",
        "metric": "val_rmse",
        "mode": "min",
        "value": 1.0,
        "epoch": 1,
        "config": SMALL | {"epochs": 2, "dropout": 0.1, "seed": 3},
        "checkpoint": "unused",
        "data": {"input_dir": str(tiny_data / "inputs"), "label_dir": str(tiny_data / "labels")},
    }
    (exp / "best.yaml").write_text(yaml.safe_dump(best))
    out = tmp_path / "final"
    assert run(["--experiment", str(exp), "--out-dir", str(out), "--no-progress", "--device", "cpu"]) == 0
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert (cfg["dropout"], cfg["epochs"], cfg["seed"], cfg["base_channels"]) == (0.1, 2, 3, 4)
    assert json.loads((out / "metrics.json").read_text())["input_dir"] == str(tiny_data / "inputs")
    assert run(["--experiment", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path / "x")]) == 2


@pytest.mark.slow
def test_wandb_offline_without_key(tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "wb"
    argv = train_args(tmp_path, tiny_data, out, "--epochs", "1", "--wandb")
    assert run(argv) == 0
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


@pytest.mark.slow
def test_real_tiles_end_to_end(real_data: Path, tmp_path: Path) -> None:
    """The 17 real tiles: val metrics are pooled over exactly the 116 labelled val pixels (70 test)."""
    out = tmp_path / "real"
    argv = train_args(tmp_path, real_data, out, "--epochs", "4", base_channels=8, depth=3)
    assert run(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val_n"] == 116 and metrics["test_n"] == 70
    assert len(pq.read_table(out / "predictions.parquet")) == 116 + 70
    assert np.isfinite(metrics["val_rmse"]) and np.isfinite(metrics["test_r2"])


@pytest.mark.slow
def test_calibration_none_keeps_the_models_variance(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "raw"
    assert run(train_args(tmp_path, tiny_data, out, "--epochs", "1", "--calibration", "none")) == 0
    printed = capsys.readouterr().out
    assert load_calibration(out / CALIBRATION_FILE).method == "none"
    table = pq.read_table(out / "predictions.parquet").to_pandas()
    np.testing.assert_array_equal(table["std"], table.std_uncalibrated)
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("val_nll", "test_within_1sigma", "test_uce"):
        assert metrics[key] == pytest.approx(metrics["uncalibrated"][key], rel=1e-6)
    assert "calibration: none" in printed and " before " not in printed
    assert (out / "plots" / "val_reliability.png").is_file()
    assert run(train_args(tmp_path, tiny_data, tmp_path / "x", "--calibration", "platt")) == 2


def test_calibration_distance_widens_by_the_pixels_bands(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--calibration distance: calibration.json holds the train pixels' band statistics; every written std is the
    uncalibrated one x the factor x max(1, d / d_ref) of that pixel's own bands (read back from the input tiles), and
    the factor puts 68.27 % of the val pixels inside 1 sigma with the widening applied."""
    out = tmp_path / "dist"
    assert run(train_args(tmp_path, tiny_data, out, "--epochs", "1", "--calibration", "distance")) == 0
    cal = load_calibration(out / CALIBRATION_FILE)
    assert cal.method == "distance" and cal.split == "val" and len(cal.band_mean) == 14
    x = []
    for f in sorted((tiny_data / "labels" / "train").glob("*.npy")):
        x.append(np.load(tiny_data / "inputs" / "train" / f.name)[:, np.isfinite(np.load(f))].T)
    x = np.concatenate(x)
    x = x[np.isfinite(x).all(axis=1)]  # pixels with a missing band (clouds) are left out of the statistics
    np.testing.assert_allclose(cal.band_mean, x.mean(axis=0), rtol=1e-3, atol=1e-4)  # float16 store
    table = pq.read_table(out / "predictions.parquet").to_pandas()
    where = table[["split", "tile", "row", "col"]].itertuples(index=False)
    bands = np.stack([np.load(tiny_data / "inputs" / split / f"{t}.npy")[:, r, c] for split, t, r, c in where], axis=1)
    g = cal.widening(bands)
    assert g.max() > 1.0 and (g == 1.0).any()  # some pixels lie further from the train pixels than their median
    np.testing.assert_allclose(table["std"], table.std_uncalibrated * cal.scale * g, rtol=2e-3)
    val = table[table.split == "val"].assign(std_uncalibrated=lambda d: d.std_uncalibrated * g[table.split == "val"])
    assert_covers_val(cal.scale, val, cal.loss)
    assert "calibration: distance: sigma x" in capsys.readouterr().out


# -- ensembles of the best distinct configurations of a search (--ensemble-top K) -------------------------------
def hand_made_search(storage: Path, rows: list[dict], metric: str = "val_rmse", mode: str = "min") -> Path:
    """An experiment folder with the files --ensemble-top reads (search.yaml, results.parquet in the search's
    columns), from ``rows`` of ``trial_id``, ``values`` (the metric per epoch) and ``config`` (searched values)."""
    space = parse_search_space(tiny_space(experiment__metric=metric, experiment__mode=mode))
    exp = Experiment.at(str(storage), "exp")
    exp.write_search({"space": space.to_dict(), "overrides": {}, "data": {}})
    records = []
    for r in rows:
        for epoch, v in enumerate(r["values"], start=1):
            records.append({"trial_id": r["trial_id"], "epoch": epoch, metric: v, "config": r["config"]})
    write_results(exp.uri, results_frame(records, space))
    return Path(exp.uri)


SEARCH_ROWS = [
    {"trial_id": "a", "values": [5.0, 3.0, 4.0], "config": {"lr": 3e-3, "optimizer": "adamw"}},
    {"trial_id": "b", "values": [4.0, 2.5], "config": {"lr": 3e-3, "optimizer": "adamw"}},  # the same as a
    {"trial_id": "c", "values": [2.8], "config": {"lr": 1e-3, "optimizer": "sgd", "momentum": 0.9}},
    {"trial_id": "d", "values": [math.inf, math.nan], "config": {"lr": 5e-3, "optimizer": "adamw"}},  # diverged
    {"trial_id": "e", "values": [3.6, 3.5], "config": {"lr": 1e-3, "optimizer": "sgd", "momentum": 0.85}},
]


def test_ensemble_top_takes_the_best_distinct_configurations(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--ensemble-top K plans the K best distinct configurations (ranked at each trial's best epoch, one per set of
    searched values) as members, each with its trial's searched values, nothing trained (--print-config)."""
    exp = hand_made_search(tmp_path / "st", SEARCH_ROWS)
    data = ["--input-dir", "in", "--label-dir", "lab"]
    doc = printed_config(capsys, "--experiment", str(exp), "--ensemble-top", "3", *data)
    # b (2.5 at epoch 2) and a (3.0) sampled the same configuration: it counts once, as b; d has no finite value.
    assert [m["trial_id"] for m in doc["members"]] == ["b", "c", "e"]
    assert doc["final"]["kind"] == "configs" and doc["config"]["optimizer"] == "adamw"
    assert doc["members"][1]["differences"] == {"lr": 1e-3, "optimizer": "sgd"}  # momentum 0.9: the default
    assert doc["members"][2]["differences"] == {"lr": 1e-3, "optimizer": "sgd", "momentum": 0.85}
    one = printed_config(capsys, "--experiment", str(exp), "--ensemble-top", "1", *data)
    assert [m["trial_id"] for m in one["members"]] == ["b"]
    # mode max (e.g. val_r2): the highest value of each trial, the highest first
    exp_max = hand_made_search(tmp_path / "st2", SEARCH_ROWS, metric="val_r2", mode="max")
    doc = printed_config(capsys, "--experiment", str(exp_max), "--ensemble-top", "3", *data)
    assert [m["trial_id"] for m in doc["members"]] == ["a", "e", "c"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--ensemble-top", "0"], "--ensemble-top: must be >= 1 (the number of configurations), got 0"),
        (["--ensemble-top", "-2"], "--ensemble-top: must be >= 1"),
        (["--ensemble-top", "4"], "--ensemble-top 4: {exp} has 3 distinct configurations with a finite val_rmse "
                                  "(4 trials); allowed: 1 to 3"),
        (["--ensemble-top", "2", "--ensemble", "0"], "--ensemble: must be >= 1, got 0"),
        (["--ensemble-top", "2", "--train_mode", "resume"], "--ensemble-top: --train_mode resume"),
        (["--ensemble-top", "two"], "argument --ensemble-top: invalid int value: 'two'"),
    ],
)  # fmt: skip
def test_ensemble_top_bad_values_are_one_line_and_keep_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    exp = hand_made_search(tmp_path / "st", SEARCH_ROWS)
    out = tmp_path / "run"
    (out / "members" / "member_00").mkdir(parents=True)
    (out / "members" / "member_00" / "best.pt").write_bytes(b"an earlier run")
    (out / "metrics.json").write_text("{}")
    before = sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*"))
    assert run(["--experiment", str(exp), *flags, "--out-dir", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message.format(exp=exp) in err[0], err
    assert sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*")) == before


def test_ensemble_top_needs_an_experiment_with_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert run(["--ensemble-top", "2", "--out-dir", str(out)]) == 2
    assert "error: --ensemble-top: needs --experiment STORAGE/NAME" in capsys.readouterr().err
    exp = hand_made_search(tmp_path / "st", SEARCH_ROWS)
    (exp / "results.parquet").unlink()  # a search that has not reported yet
    assert run(["--experiment", str(exp), "--ensemble-top", "2", "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --ensemble-top 2: {exp}/results.parquet: no results (no trial has reported an epoch yet); "
                   "allowed: a search folder whose results.parquet has rows"]  # fmt: skip
    assert run(["--experiment", str(tmp_path / "nowhere"), "--ensemble-top", "2", "--out-dir", str(out)]) == 2
    assert "search.yaml not found; expected a search's folder STORAGE/NAME" in capsys.readouterr().err
    assert not out.exists()


@pytest.fixture(scope="module")
def small_search(
    ray_local: None,  # noqa: F811
    tiny_data: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """A real search on the tiny data (3 trials, ASHA rungs at 1 and 2 of 4 epochs), its first two trials the same
    point: two distinct configurations, one of them sampled twice."""
    from tune_agb.search.cli import main as search_main

    tmp = tmp_path_factory.mktemp("ens_search")
    point = {"lr": 3.0e-3, "optimizer": "adamw"}
    space = write_space(
        tmp / "tiny.yaml", tiny_space(experiment__num_samples=3, searcher__points_to_evaluate=[point, point])
    )
    argv = ["--space", str(space), "--input-dir", str(tiny_data / "inputs"), "--label-dir", str(tiny_data / "labels")]
    assert search_main([*argv, "--storage", str(tmp / "st"), "--name", "exp"]) == 0
    return tmp / "st" / "exp"


def expected_top(exp: Path, k: int) -> pd.DataFrame:
    """The k best trials by their best epoch's val_rmse, one per set of searched values, straight from pandas."""
    df = pd.read_parquet(exp / "results.parquet")
    best = df.loc[df.groupby("trial_id")["val_rmse"].idxmin()].sort_values(["val_rmse", "trial_id"])
    return best.drop_duplicates(["config/lr", "config/optimizer", "config/momentum"]).head(k)


@pytest.mark.slow
def test_ensemble_top_trains_the_best_distinct_configurations(
    small_search: Path, tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exp = small_search
    df = pd.read_parquet(exp / "results.parquet")
    first_two = df.sort_values("wall_time").drop_duplicates("trial_id")["trial_id"].head(2)
    params = df[df.trial_id.isin(first_two)].drop_duplicates("trial_id")[["config/lr", "config/optimizer"]]
    assert len(params.drop_duplicates()) == 1  # the same point twice: one configuration, two trials
    assert df.trial_id.nunique() == 3
    # Three trials, two distinct configurations: a third member is refused, naming the flag and what is allowed.
    assert run(["--experiment", str(exp), "--ensemble-top", "3", "--out-dir", str(tmp_path / "x")]) == 2
    assert (
        f"--ensemble-top 3: {exp} has 2 distinct configurations with a finite val_rmse (3 trials); allowed: 1 to 2"
        in (capsys.readouterr().err)
    )
    want = expected_top(exp, 2)
    out = tmp_path / "ens"
    # An earlier, larger ensemble in the out dir: --overwrite replaces it whole (no third member left behind).
    (out / "members" / "member_02").mkdir(parents=True)
    (out / "members" / "member_02" / "best.pt").write_bytes(b"stale")
    (out / "best.pt").write_bytes(b"stale")
    argv = ["--experiment", str(exp), "--ensemble-top", "2", "--epochs", "2", "--out-dir", str(out), "--overwrite"]
    assert run([*argv, "--no-progress", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in (out / "members").iterdir()) == ["member_00", "member_01"]
    assert not (out / "best.pt").exists()

    # Each member has its trial's own complete config (the search's, with --epochs applied) ...
    space = parse_search_space(yaml.safe_load((exp / "search.yaml").read_text())["space"])
    ens = yaml.safe_load((out / "ensemble.yaml").read_text())
    assert (ens["format"], ens["kind"], ens["metric"]) == ("tune_agb.ensemble/1", "configs", "val_rmse")
    assert [m["trial_id"] for m in ens["members"]] == list(want["trial_id"])
    for k, (member, (_, row)) in enumerate(zip(ens["members"], want.iterrows(), strict=True)):
        cfg = yaml.safe_load((out / "members" / f"member_{k:02d}" / "config.yaml").read_text())
        assert member["folder"] == f"members/member_{k:02d}"
        assert member["value"] == pytest.approx(row["val_rmse"]) and member["epoch"] == row["epoch"]
        assert cfg["lr"] == pytest.approx(row["config/lr"]) and cfg["optimizer"] == row["config/optimizer"]
        if row["config/optimizer"] == "sgd":
            assert cfg["momentum"] == pytest.approx(row["config/momentum"])
        assert (cfg["epochs"], cfg["base_channels"], cfg["depth"], cfg["schedule"]) == (2, 4, 2, "constant")
        # ... the config the trial itself trained with (its checkpoint's), apart from the epoch budget.
        ckpt = sorted(Path(row["trial_path"]).glob("checkpoint_*/checkpoint.pt"))[-1]
        assert load_checkpoint(ckpt)["config"] | {"epochs": 2} == cfg
        assert space.trial_config(member["params"]).replace(epochs=2).to_dict() == cfg
    assert ens["members"][0]["params"] != ens["members"][1]["params"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["ensemble"], metrics["ensemble_of"]) == (2, "configs")
    assert [m["trial_id"] for m in metrics["members"]] == list(want["trial_id"])
    assert metrics["search"] == {"experiment": str(exp), "metric": "val_rmse", "mode": "min"}
    for tid in want["trial_id"]:
        assert tid in printed.split("params")[1]

    # The ensemble in predictions.parquet combines the members' own predictions: their precision-weighted mixture
    # (before calibration), for val and test.
    table = pq.read_table(out / "predictions.parquet").to_pandas()
    members = [load_predictor(out / "members" / f"member_{k:02d}", "cpu") for k in range(2)]
    assert [m.members[0].config.lr for m in members] == pytest.approx(list(want["config/lr"]))
    for split in ("val", "test"):
        tiles = load_split(tiny_data / "inputs", tiny_data / "labels", split)
        outs = [m.predict(tiles.inputs) for m in members]
        means = np.stack([o[0].numpy() for o in outs]).astype(np.float64)
        varis = np.stack([o[1].numpy() for o in outs]).astype(np.float64) ** 2
        rows = table[table.split == split]
        ti = np.array([tiles.names.index(t) for t in rows.tile])
        at = (slice(None), ti, rows.row.to_numpy(), rows.col.to_numpy())
        m, v = means[at], varis[at]
        assert not np.allclose(m[0], m[1])  # two different models
        want_mean, want_var = precision_mixture(m, v)
        np.testing.assert_allclose(rows["mean"], want_mean, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(rows.std_uncalibrated**2, want_var, rtol=1e-3, atol=1e-3)
        rmse = float(np.sqrt(np.mean((want_mean - rows.label) ** 2)))
        assert metrics[f"{split}_rmse"] == pytest.approx(rmse, rel=1e-4)
        assert [r[f"{split}_rmse"] for r in metrics["members"]] == pytest.approx(
            [float(np.sqrt(np.mean((mk - rows.label) ** 2))) for mk in m], rel=1e-4
        )
    # predict loads the ensemble: both members, each with its own config; the map is the combination, calibrated.
    ens_pred = load_predictor(out, "cpu")
    assert [mb.config.to_dict() for mb in ens_pred.members] == [mb.members[0].config.to_dict() for mb in members]
    val = load_split(tiny_data / "inputs", tiny_data / "labels", "val")
    src = write_tif(tmp_path / "tile.tif", np.asarray(val.inputs[0], dtype=np.float32))
    assert run_cli(predict_main, ["--model", str(out), "--image", str(src), "--out", str(tmp_path / "map.tif"),
                                  "--no-progress", "--device", "cpu"]) == 0  # fmt: skip
    with rasterio.open(tmp_path / "map.tif") as ds:
        mean_map, std_map = ds.read()
    outs = [mb.predict(val.inputs[:1]) for mb in members]
    mean = np.mean([o[0][0].numpy() for o in outs], axis=0)
    var = np.mean([o[1][0].numpy() ** 2 for o in outs], axis=0) + np.var([o[0][0].numpy() for o in outs], axis=0)
    cal = load_calibration(out / CALIBRATION_FILE)
    np.testing.assert_allclose(mean_map, mean, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(std_map, np.sqrt(cal.variance(var)), rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_ensemble_top_with_seeds_trains_each_configuration_n_times(
    small_search: Path, tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--ensemble-top K --ensemble N: K configurations x N seeds, member_{k * N + i} = configuration k, seed + i."""
    exp = small_search
    want = list(expected_top(exp, 2)["trial_id"])
    out = tmp_path / "ens"
    argv = ["--experiment", str(exp), "--ensemble-top", "2", "--ensemble", "2", "--epochs", "1", "--seed", "7"]
    assert run([*argv, "--out-dir", str(out), "--no-progress", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    names = [f"member_{k:02d}" for k in range(4)]
    assert sorted(p.name for p in (out / "members").iterdir()) == names
    ens = yaml.safe_load((out / "ensemble.yaml").read_text())
    assert ens["kind"] == "configs"
    assert [(m["trial_id"], m["seed"]) for m in ens["members"]] == [
        (want[0], 7), (want[0], 8), (want[1], 7), (want[1], 8)
    ]  # fmt: skip
    cfgs = [yaml.safe_load((out / "members" / n / "config.yaml").read_text()) for n in names]
    assert [c["seed"] for c in cfgs] == [7, 8, 7, 8]
    # the two seeds of a configuration differ in the seed alone; the two configurations in their searched values
    assert cfgs[0] | {"seed": 0} == cfgs[1] | {"seed": 0} and cfgs[2] | {"seed": 0} == cfgs[3] | {"seed": 0}
    assert cfgs[0] | {"seed": 0} != cfgs[2] | {"seed": 0}
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["ensemble"], metrics["ensemble_of"]) == (4, "configs")
    assert [(m["trial_id"], m["seed"]) for m in metrics["members"]] == [
        (m["trial_id"], m["seed"]) for m in ens["members"]
    ]
    members = [load_predictor(out / "members" / n, "cpu") for n in names]
    test = load_split(tiny_data / "inputs", tiny_data / "labels", "test")
    outs = [m.predict(test.inputs) for m in members]
    means = np.stack([o[0].numpy() for o in outs]).astype(np.float64)
    varis = np.stack([o[1].numpy() for o in outs]).astype(np.float64) ** 2
    assert not np.allclose(means[0], means[1])  # another seed, another model
    table = pq.read_table(out / "predictions.parquet").to_pandas()
    rows = table[table.split == "test"]
    ti = np.array([test.names.index(t) for t in rows.tile])
    at = (slice(None), ti, rows.row.to_numpy(), rows.col.to_numpy())
    combined, _ = precision_mixture(means[at], varis[at])
    np.testing.assert_allclose(rows["mean"], combined, rtol=1e-3, atol=1e-3)  # all four members combined
    assert len(load_predictor(out, "cpu").members) == 4
    assert printed.count(want[0]) >= 2 and " seed " in printed
