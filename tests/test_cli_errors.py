"""Bad input: one line naming the file or field, a non-zero exit, no traceback, earlier outputs intact."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml

from tune_agb.errors import run_cli
from tune_agb.final_train.cli import main

SMALL = {"base_channels": 4, "depth": 2, "batch_size": 4, "epochs": 1}


def _drop_split(d: Path) -> str:
    shutil.rmtree(d / "labels" / "val")
    return "labels/val"


def _rename(d: Path) -> str:
    src = next((d / "labels" / "train").glob("*.npy"))
    src.rename(src.with_name("renamed.npy"))
    return "renamed"


def _channels(d: Path) -> str:
    p = next((d / "inputs" / "test").glob("*.npy"))
    np.save(p, np.load(p)[:13])
    return "has 13 channels, expected 14"


def _label_shape(d: Path) -> str:
    p = next((d / "labels" / "train").glob("*.npy"))
    np.save(p, np.load(p)[:-3])
    return "does not match its image"


def _corrupt(d: Path) -> str:
    p = sorted((d / "inputs" / "val").glob("*.npy"))[0]
    p.write_bytes(b"\x93NUMPY garbage")
    return p.name


def _no_labels(d: Path) -> str:
    for p in (d / "labels" / "val").glob("*.npy"):
        np.save(p, np.full_like(np.load(p), np.nan))
    return "no labelled pixel"


def _all_nan_input(d: Path) -> str:
    p = sorted((d / "inputs" / "train").glob("*.npy"))[0]
    a = np.load(p)
    a[:] = np.nan
    a[0, 0, 0] = np.inf
    np.save(p, a)
    return "NaN/inf"


def _string_dtype(d: Path) -> str:
    p = sorted((d / "inputs" / "train").glob("*.npy"))[0]
    np.save(p, np.full((14, 32, 32), "x"))
    return "not numeric"


CASES: dict[str, Callable[[Path], str]] = {
    "missing split": _drop_split,
    "different names": _rename,
    "wrong channel count": _channels,
    "label shape": _label_shape,
    "corrupt npy": _corrupt,
    "no labelled pixel": _no_labels,
    "inputs all NaN/inf": _all_nan_input,
    "non-numeric dtype": _string_dtype,
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_dataset_one_line_and_earlier_outputs_intact(
    case: str, tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    expected = CASES[case](data)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("earlier output")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(SMALL))
    code = run_cli(
        main,
        [
            "--config",
            str(cfg),
            "--input-dir",
            str(data / "inputs"),
            "--label-dir",
            str(data / "labels"),
            "--out-dir",
            str(out),
            "--device",
            "cpu",
        ],
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "earlier output"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ({"base_channel": 8}, "unknown key 'base_channel'; valid keys: in_channels, base_channels, depth"),
        ({"lr": "1e-3"}, "'lr' must be a number"),
        ({"optimizer": "rmsprop"}, "'optimizer' must be one of adam, adamw, sgd"),
        ({"dropout": 1.5}, "'dropout' must be in [0, 1)"),
        ({"nll_beta": 0.5}, "'nll_beta' was removed in tune_agb 0.2"),
        ({"band_dropout": 0.2}, "this config uses band_dropout=0.2 (only 0.0 still loads)"),
    ],
)
def test_bad_config_names_the_key(
    content: dict, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(content))
    assert run_cli(main, ["--config", str(cfg), "--out-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert expected in err and str(cfg) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_cli_process_unknown_flag_and_existing_run(tmp_path: Path) -> None:
    """Through a real process: exit code 2, one line on stderr, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "tune_agb.final_train", "--nb_epochs", "3"], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: python -m tune_agb.final_train: unrecognized arguments: --nb_epochs 3 (see --help)"
    ]
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text("{}")
    proc = subprocess.run(
        [sys.executable, "-m", "tune_agb.final_train", "--out-dir", str(run)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "already holds a run" in proc.stderr and "--overwrite" in proc.stderr
    assert (run / "metrics.json").read_text() == "{}"


@pytest.mark.slow
def test_search_cli_process_bad_set_key(tmp_path: Path) -> None:
    """``--set`` with an unknown key: one line naming it and the allowed keys, exit 2, before Ray starts."""
    space = tmp_path / "s.yaml"
    space.write_text(yaml.safe_dump({"params": {"lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-2}}}))
    argv = [sys.executable, "-m", "tune_agb.search", "--space", str(space), "--set", "searcher.sed=3"]
    proc = subprocess.run([*argv, "--storage", str(tmp_path / "st")], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {space} with --set searcher.sed=3: searcher.sed: unknown key; allowed: type, seed, "
        "n_startup_trials, constant_liar, multivariate, points_to_evaluate"
    ]
    assert not (tmp_path / "st").exists()
