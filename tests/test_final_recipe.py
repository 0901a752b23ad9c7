"""One recipe, in files: a search space's ``final:`` section says how final_train builds the final model.

The section is validated with the rest of the space (one line naming ``final.KEY``), stored with the experiment,
and final_train ``--experiment`` takes it as its defaults, which its flags, ``--set final.KEY`` and ``run()``'s
arguments override; ``--print-config`` says where each option came from. A search without the section is retrained
as before.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.search_helpers import ray_local, tiny_space, write_space  # noqa: F401 (fixture)
from tune_agb.errors import TuneAgbError, run_cli
from tune_agb.final_train import resolved_config
from tune_agb.final_train.cli import main
from tune_agb.runs import CALIBRATION_FILE, best_of, load_calibration, read_results, write_best, write_results
from tune_agb.search.experiment import Experiment
from tune_agb.search.results import results_frame
from tune_agb.search.space import load_search_space, parse_search_space

NO_DATA = ["--input-dir", "in", "--label-dir", "lab"]  # never opened: --print-config only plans


def run(argv: list[str]) -> int:
    return run_cli(main, argv)


def printed(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    """``--print-config`` with ``argv``: the YAML it prints, parsed (exit code 0 checked)."""
    assert run(["--print-config", *argv]) == 0
    return yaml.safe_load(capsys.readouterr().out)


# -- the section in the space file ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("final", "cv", "message"),
    [
        ({"members": 2}, None, "final.members: unknown key; allowed: ensemble_top, ensemble, cv_final, calibration, "
                               "forest"),
        ({"ensemble_top": 0}, None, "final.ensemble_top: must be an integer >= 1 (the number of best distinct "
                                    "configurations) or null (the best configuration alone), got 0"),
        ({"ensemble_top": "3"}, None, "final.ensemble_top: must be an integer >= 1"),
        ({"ensemble_top": 5}, None, "final.ensemble_top: must be <= experiment.num_samples (4), got 5"),
        ({"ensemble": 0}, None, "final.ensemble: must be an integer >= 1 (seeds per configuration), got 0"),
        ({"ensemble": True}, None, "final.ensemble: must be an integer >= 1"),
        ({"calibration": "platt"}, None, "final.calibration: must be one of none, scale, isotonic, distance, got"),
        ({"cv_final": "refit"}, {"k": 2}, "final.cv_final: must be one of retrain, folds or null"),
        ({"cv_final": "retrain"}, None, "final.cv_final: needs a cv: section (a spatial k-fold search)"),
        ({"cv_final": "folds", "ensemble_top": 2}, {"k": 2}, "final.cv_final: folds keeps one trial's fold models; "
                                                            "it cannot go with ensemble_top"),
        ({"cv_final": "retrain", "ensemble": 2}, {"k": 2}, "final.ensemble: must be 1 with cv_final (retrain), got 2"),
        ([3], None, "final: must be a mapping"),
    ],
)  # fmt: skip
def test_a_bad_final_section_is_one_line_naming_the_key(
    tmp_path: Path, final: object, cv: dict | None, message: str
) -> None:
    path = write_space(tmp_path / "space.yaml", tiny_space(final=final, **({"cv": cv} if cv else {})))
    with pytest.raises(TuneAgbError) as err:
        load_search_space(path)
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"{path}: {message}"), text


def test_the_section_is_part_of_the_space_and_absent_when_not_given(tiny_data: Path) -> None:
    from tune_agb.search import resolved_config as search_resolved

    space = parse_search_space(tiny_space(final={"ensemble_top": 2, "calibration": "Isotonic"}))
    assert space.final == {"ensemble_top": 2, "calibration": "isotonic"}  # as given, normalised
    assert space.to_dict()["final"] == space.final
    assert parse_search_space(space.to_dict()).to_dict() == space.to_dict()  # what search.yaml stores reads back
    plain = parse_search_space(tiny_space())
    assert plain.final is None and "final" not in plain.to_dict()  # spaces without it: as stored before
    assert parse_search_space(tiny_space(final={})).fingerprint() == plain.fingerprint()
    assert space.fingerprint() != plain.fingerprint()  # a resumed search compares it as the rest of the space
    # the search command's --set reaches the section too, validated like the file
    data = {"input_dir": tiny_data / "inputs", "label_dir": tiny_data / "labels"}
    doc = search_resolved(tiny_space(), **data, overrides=["final.ensemble_top=3", "final.ensemble=2"])
    assert doc["final"] == {"ensemble_top": 3, "ensemble": 2}
    with pytest.raises(TuneAgbError, match=r"final\.ensemble_top: must be <= experiment\.num_samples \(4\), got 9"):
        search_resolved(tiny_space(), **data, overrides=["final.ensemble_top=9"])


# -- final_train --experiment with the recipe, on a hand-made search ---------------------------------------------
ROWS = [  # trial, val_rmse per epoch, searched values: best first c (2.8), e (3.5), a (3.0 -> counted at 3.0)
    ("a", [5.0, 3.0, 4.0], {"lr": 3e-3, "optimizer": "adamw"}),
    ("c", [2.8], {"lr": 1e-3, "optimizer": "sgd", "momentum": 0.9}),
    ("e", [3.6, 3.5], {"lr": 1e-3, "optimizer": "sgd", "momentum": 0.85}),
]


def hand_made_search(storage: Path, final: dict | None, overrides: dict | None = None) -> str:
    """A search folder as final_train reads it (search.yaml with the space, results.parquet, best.yaml)."""
    space = parse_search_space(tiny_space(**({"final": final} if final is not None else {})))
    exp = Experiment.at(str(storage), "exp")
    exp.write_search({"space": space.to_dict(), "overrides": overrides or {}, "data": {}})
    records = [
        {"trial_id": tid, "epoch": e, "val_rmse": v, "config": cfg}
        for tid, values, cfg in ROWS
        for e, v in enumerate(values, start=1)
    ]
    write_results(exp.uri, results_frame(records, space))
    write_best(exp.uri, best_of(read_results(exp.uri), space, exp.uri, "in", "lab"))
    return exp.uri


def test_the_recipe_is_final_trains_default_and_every_flag_overrides_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exp = hand_made_search(tmp_path / "st", {"ensemble_top": 2, "calibration": "isotonic"})
    doc = printed(capsys, "--experiment", exp, *NO_DATA)
    assert [m["trial_id"] for m in doc["members"]] == ["c", "a"]
    fin = doc["final"]
    assert (fin["kind"], fin["members"], fin["ensemble_top"], fin["ensemble"], fin["calibration"]) == (
        "configs", 2, 2, 1, "isotonic"
    )  # fmt: skip
    assert fin["from"] == {
        "ensemble_top": "search space", "ensemble": "default", "cv_final": "default", "calibration": "search space",
        "forest": "default",
    }  # fmt: skip
    # a flag wins over the section, key by key; the section's other keys still apply
    doc = printed(capsys, "--experiment", exp, *NO_DATA, "--ensemble-top", "1", "--ensemble", "2")
    assert [(m["trial_id"], m["differences"].get("seed")) for m in doc["members"]] == [("c", None), ("c", 1)]
    assert doc["final"]["calibration"] == "isotonic" and doc["final"]["from"]["ensemble_top"] == "flag/--set"
    # --set final.KEY does the same; null drops the section's top-K: the best trial alone, as without the section
    doc = printed(capsys, "--experiment", exp, *NO_DATA, "--set", "final.ensemble_top=null", "--calibration", "none")
    assert (doc["final"]["kind"], doc["final"]["calibration"]) == ("single", "none")
    assert doc["source"].startswith("best trial c of ")
    # run()'s arguments (resolved_config is what run would train) win too; not given (None): the section's
    api = resolved_config(experiment=exp, input_dir="in", label_dir="lab", ensemble=2, calibration=None)
    assert (api["final"]["members"], api["final"]["calibration"]) == (4, "isotonic")
    assert api["final"]["from"]["ensemble"] == "argument"


def test_without_a_final_section_final_train_is_unchanged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exp = hand_made_search(tmp_path / "st", None)
    doc = printed(capsys, "--experiment", exp, *NO_DATA)
    assert (doc["final"]["kind"], doc["final"]["members"], doc["final"]["calibration"]) == ("single", 1, "scale")
    assert set(doc["final"]["from"].values()) == {"default"} and "members" not in doc
    assert printed(capsys, "--experiment", exp, *NO_DATA, "--ensemble-top", "3")["final"]["members"] == 3


def test_the_searchs_own_set_items_are_part_of_its_recipe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``search --set final.ensemble_top=3`` is recorded with the search (search.yaml's overrides) and applies."""
    exp = hand_made_search(tmp_path / "st", {"ensemble_top": 2}, overrides={"final.ensemble_top": 3})
    assert printed(capsys, "--experiment", exp, *NO_DATA)["final"]["members"] == 3
    exp = hand_made_search(tmp_path / "st2", None, overrides={"final.calibration": "none"})
    doc = printed(capsys, "--experiment", exp, *NO_DATA)
    assert (doc["final"]["calibration"], doc["final"]["from"]["calibration"]) == ("none", "search space")


def test_an_error_about_a_recipe_value_says_where_it_came_from(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exp = hand_made_search(tmp_path / "st", {"ensemble_top": 2, "calibration": "isotonic"})
    out = tmp_path / "run"
    assert run(["--experiment", exp, *NO_DATA, "--cv-final", "folds", "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --ensemble-top with --cv-final folds"), err
    assert err[0].endswith(
        f"(ensemble_top: 2: from the final: section of {exp}'s search space; a flag or --set final.KEY=VALUE "
        "overrides it)"
    )  # calibration is not named: the error is not about it
    assert run(["--experiment", exp, *NO_DATA, "--ensemble-top", "4", "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "allowed: 1 to 3" in err and "final: section" not in err  # the flag's value: no note
    assert not out.exists()


# -- a real search with the section, then final_train --experiment and no flags ----------------------------------
@pytest.mark.slow
def test_search_then_final_train_without_flags_builds_what_the_section_says(
    ray_local: None,  # noqa: F811
    tiny_data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tune_agb.search.cli import main as search_main

    recipe = {"ensemble_top": 2, "calibration": "none"}  # (isotonic falls back to scale on the tiny val split)
    space = write_space(tmp_path / "tiny.yaml", tiny_space(experiment__num_samples=3, final=recipe))
    data = ["--input-dir", str(tiny_data / "inputs"), "--label-dir", str(tiny_data / "labels")]
    assert search_main(["--space", str(space), *data, "--storage", str(tmp_path / "st"), "--name", "exp"]) == 0
    exp = tmp_path / "st" / "exp"
    assert yaml.safe_load((exp / "search.yaml").read_text())["space"]["final"] == recipe  # stored with the search
    df = pd.read_parquet(exp / "results.parquet")
    best = df.loc[df.groupby("trial_id")["val_rmse"].idxmin()].sort_values(["val_rmse", "trial_id"])
    want = list(best.drop_duplicates(["config/lr", "config/optimizer", "config/momentum"])["trial_id"].head(2))

    out = tmp_path / "final"
    assert run(["--experiment", str(exp), "--out-dir", str(out)]) == 0  # no further flags
    ens = yaml.safe_load((out / "ensemble.yaml").read_text())
    assert ens["kind"] == "configs" and [m["trial_id"] for m in ens["members"]] == want
    assert sorted(p.name for p in (out / "members").iterdir()) == ["member_00", "member_01"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["ensemble"], metrics["ensemble_of"], metrics["calibration"]["method"]) == (2, "configs", "none")
    assert load_calibration(out / CALIBRATION_FILE).method == "none"
    # flags override the section: the best configuration alone, its sigma scaled
    out1 = tmp_path / "final1"
    argv = ["--experiment", str(exp), "--ensemble-top", "1", "--calibration", "scale", "--epochs", "1"]
    assert run([*argv, "--out-dir", str(out1), "--no-progress"]) == 0
    ens = yaml.safe_load((out1 / "ensemble.yaml").read_text())
    assert [m["trial_id"] for m in ens["members"]] == want[:1]
    assert load_calibration(out1 / CALIBRATION_FILE).method == "scale"
