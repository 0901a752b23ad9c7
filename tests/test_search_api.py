"""The search's Python API (``tune_agb.search.run``), the ``--set``/``--print-config`` flags, and the shared override
parser (``tune_agb.overrides``)."""

from __future__ import annotations

import math
import pydoc
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

import tune_agb.search as search
from tests.search_helpers import ray_local, tiny_space, write_space  # noqa: F401 (fixture)
from tune_agb.errors import TuneAgbError, run_cli
from tune_agb.overrides import apply_overrides, parse_override, parse_overrides
from tune_agb.search.cli import main


def data_args(data: Path) -> dict[str, str]:
    return {"input_dir": str(data / "inputs"), "label_dir": str(data / "labels")}


@pytest.fixture(scope="module")
def api_search(
    ray_local: None,  # noqa: F811
    tiny_data: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> SimpleNamespace:
    """One small search (3 trials, set by an override) run through ``tune_agb.search.run``."""
    tmp = tmp_path_factory.mktemp("api")
    space = write_space(tmp / "tiny.yaml", tiny_space())
    kwargs = {"storage": tmp / "st", "name": "exp", **data_args(tiny_data), "quiet": True}
    outcome = search.run(space, overrides=["experiment.num_samples=3"], **kwargs)
    return SimpleNamespace(outcome=outcome, space=space, kwargs=kwargs, exp=tmp / "st" / "exp")


@pytest.mark.slow
def test_run_returns_the_results_table_and_the_best_configuration(api_search: SimpleNamespace) -> None:
    out = api_search.outcome
    assert out.experiment == str(api_search.exp)
    assert out.complete and not out.interrupted and (out.errored, out.unfinished) == (0, 0)
    df = out.results
    assert df["trial_id"].nunique() == 3  # the override, not the file's 4
    on_disk = pd.read_parquet(api_search.exp / "results.parquet")
    pd.testing.assert_frame_equal(
        df[["trial_id", "epoch", "val_rmse"]].reset_index(drop=True), on_disk[["trial_id", "epoch", "val_rmse"]]
    )
    row = df.loc[df["val_rmse"].idxmin()]
    assert (out.best.trial_id, out.best.epoch) == (row["trial_id"], row["epoch"])
    assert out.best.value == pytest.approx(row["val_rmse"]) and math.isfinite(out.best.value)
    assert yaml.safe_load((api_search.exp / "best.yaml").read_text()) == out.best.to_dict()
    assert out.best.config["lr"] == pytest.approx(row["config/lr"])
    record = yaml.safe_load((api_search.exp / "search.yaml").read_text())
    assert record["overrides"] == {"experiment.num_samples": 3}
    text = out.summary(top=2)
    assert out.best.trial_id in text and f"--experiment {api_search.exp} --out-dir" in text


@pytest.mark.slow
def test_resume_checks_the_recorded_overrides(api_search: SimpleNamespace) -> None:
    with pytest.raises(TuneAgbError, match=r"--set experiment\.num_samples=5 differs from the search's .*=3"):
        search.run(api_search.space, resume=True, overrides={"experiment.num_samples": 5}, **api_search.kwargs)
    # Without overrides the resumed search keeps its own (3 trials): nothing is left to run.
    again = search.run(api_search.space, resume=True, **api_search.kwargs)
    assert again.complete and again.best == api_search.outcome.best
    assert again.results["trial_id"].nunique() == 3


@pytest.mark.slow
def test_one_trial_at_a_time_repeats_a_seeded_search_exactly(
    ray_local: None,  # noqa: F811
    tiny_data: Path,
    tmp_path: Path,
) -> None:
    """With ``max_concurrent: 1`` nothing depends on which trial reports first: a rerun of the same seed proposes the
    same configurations, stops them at the same rungs and scores every epoch alike (what the search-space reference
    promises; with trials side by side it need not hold: bench/RESULTS.md, "Same seed, another search")."""
    space = write_space(tmp_path / "tiny.yaml", tiny_space(experiment__max_concurrent=1, experiment__num_samples=3))
    cols = ["config/lr", "config/optimizer", "epoch", "val_rmse"]
    runs = [
        search.run(space, storage=tmp_path / "st", name=name, quiet=True, **data_args(tiny_data)).results
        for name in ("first", "again")
    ]
    first, again = (r.sort_values(["config/lr", "epoch"])[cols].reset_index(drop=True) for r in runs)
    assert first["config/lr"].nunique() == 3 and first["epoch"].nunique() > 1  # 3 trials, some past the first rung
    pd.testing.assert_frame_equal(first, again)


def test_a_space_that_is_no_file_needs_a_name(tmp_path: Path) -> None:
    with pytest.raises(TuneAgbError, match="give the experiment's name"):
        search.run(tiny_space(), storage=tmp_path / "st")
    assert not (tmp_path / "st").exists()


def test_resolved_config_applies_overrides_and_names_the_data(tiny_data: Path) -> None:
    got = search.resolved_config(tiny_space(), overrides={"fixed.depth": 3}, **data_args(tiny_data))
    assert got["fixed"]["depth"] == 3 and got["scheduler"]["max_t"] == 4
    assert got["data"] == {k: str(Path(v).resolve()) for k, v in data_args(tiny_data).items()}


def test_import_is_cheap_and_run_is_documented() -> None:
    code = "import sys, tune_agb.search; print(sorted({'ray', 'torch', 'pandas'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout == "[]\n"
    text = pydoc.render_doc(search.run)
    assert all(word in text for word in ("Args:", "overrides:", "Returns:", "SearchOutcome", "Raises:"))


# -- the command line ---------------------------------------------------------------------------------------------
def test_print_config_shows_the_space_with_its_overrides(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    space = write_space(tmp_path / "tiny.yaml", tiny_space())
    argv = ["--space", str(space), "--set", "experiment.num_samples=7", "--set", "fixed.dropout=0.1", "--seed", "9"]
    argv += ["--input-dir", str(tiny_data / "inputs"), "--label-dir", str(tiny_data / "labels"), "--print-config"]
    argv += ["--storage", str(tmp_path / "st")]
    assert run_cli(main, argv) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["experiment"]["num_samples"] == 7 and printed["searcher"]["seed"] == 9
    assert printed["fixed"]["dropout"] == 0.1 and printed["fixed"]["depth"] == 2  # the file's value kept
    assert printed["data"]["input_dir"] == str((tiny_data / "inputs").resolve())
    assert not (tmp_path / "st").exists()  # nothing started


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("sched.max_t=3", "sched: unknown key; allowed: experiment, scheduler, searcher"),
        ("scheduler.max_tt=3", "scheduler.max_tt: unknown key; allowed: type, max_t, grace_period"),
        ("experiment.num_samples=many", "experiment.num_samples: must be an integer, got 'many'"),
        ("fixed.dropout=[0.1", "--set fixed.dropout=[0.1: the value is not valid YAML"),
        ("num_samples=3", "--set num_samples=3: expected SECTION.KEY=VALUE"),
        ("experiment.num_samples", "--set experiment.num_samples: expected SECTION.KEY=VALUE"),
    ],
)
def test_bad_set_is_one_line_naming_it(
    item: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    space = write_space(tmp_path / "tiny.yaml", tiny_space())
    assert run_cli(main, ["--space", str(space), "--set", item, "--print-config"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert captured.out == ""


def test_convenience_flags_are_overrides_and_clash_with_a_resume(tmp_path: Path) -> None:
    """--num-samples is --set experiment.num_samples: a resume that changes it names the key (before Ray runs)."""
    space = write_space(tmp_path / "tiny.yaml", tiny_space())
    exp = tmp_path / "st" / "tiny"
    exp.mkdir(parents=True)
    record = {"space": tiny_space(), "overrides": {"num_samples": 3}, "data": {}}  # as recorded before --set
    (exp / "search.yaml").write_text(yaml.safe_dump(record, sort_keys=False))
    (exp / "tuner.pkl").write_bytes(b"")  # Ray's marker of a restorable experiment
    argv = ["--space", str(space), "--storage", str(tmp_path / "st"), "--resume", "--num-samples", "4"]
    with pytest.raises(TuneAgbError, match=r"--set experiment\.num_samples=4 differs from the search's .*=3"):
        main(argv)


# -- the override parser ------------------------------------------------------------------------------------------
def test_override_values_are_read_as_yaml() -> None:
    items = ["a.int=12", "a.float=1.0e-3", "a.bool=true", "a.none=null", "a.list=[1, x]", "a.text=adamw", "b.c.d=2"]
    got = parse_overrides(items)
    assert got == {
        "a.int": 12,
        "a.float": 0.001,
        "a.bool": True,
        "a.none": None,
        "a.list": [1, "x"],
        "a.text": "adamw",
        "b.c.d": 2,
    }
    assert parse_overrides(["a.x=1", "a.x=2"]) == {"a.x": 2}  # the last one wins
    assert parse_override("a.b=x=y") == ("a.b", "x=y")


def test_apply_overrides_sets_nested_keys_on_a_copy() -> None:
    raw = {"fixed": {"lr": 0.1}, "params": {"lr": {"type": "float", "low": 1, "high": 2}}, "cv": None}
    got = apply_overrides(raw, {"fixed.depth": 3, "params.lr.high": 5, "cv.k": 3, "new.key": "v"})
    assert got == {
        "fixed": {"lr": 0.1, "depth": 3},
        "params": {"lr": {"type": "float", "low": 1, "high": 5}},
        "cv": {"k": 3},
        "new": {"key": "v"},
    }
    assert raw["fixed"] == {"lr": 0.1} and raw["params"]["lr"]["high"] == 2
    with pytest.raises(TuneAgbError, match=r"--set fixed\.lr\.x: fixed\.lr is a float, not a section"):
        apply_overrides(raw, {"fixed.lr.x": 1})
    with pytest.raises(TuneAgbError, match=r"expected SECTION\.KEY=VALUE"):
        parse_overrides({"lr": 1})
