"""A spatially cross-validated search on a real local Ray, through the CLI: each epoch every trial reports the mean
over folds (what Optuna and ASHA act on), the spread and each fold's value; the folds are saved and survive an
interrupted search; the helpers final_train uses read the best configuration and its k fold models back."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from tests.search_helpers import ray_local, tiny_space, write_space  # noqa: F401 (fixture)
from tests.test_search_resume import Search, _wait_until
from tune_agb.cv import build_assignment, out_of_fold
from tune_agb.engine.inference import member_from_state
from tune_agb.runs import read_cv_best, read_folds
from tune_agb.search.asha import ResumableASHA
from tune_agb.search.cli import main
from tune_agb.search.experiment import read_trial_rows
from tune_agb.store import DataSource

pytestmark = pytest.mark.slow  # real searches

K = 3
MAX_T = 4


@pytest.fixture(scope="module")
def cv_search(
    ray_local: None,  # noqa: F811
    tiny_data: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> SimpleNamespace:
    """5 trials, one at a time (ASHA's decisions then follow the report order exactly), 3 folds of the 12 train+val
    tiles (blocks of one tile), ASHA rungs at 1 and 2 of 4 epochs."""
    tmp = tmp_path_factory.mktemp("cv_search")
    space = tiny_space(experiment__num_samples=5, experiment__max_concurrent=1, cv={"k": K, "block_size": 1})
    path = write_space(tmp / "cv.yaml", space)
    argv = ["--space", str(path), "--input-dir", str(tiny_data / "inputs"), "--label-dir", str(tiny_data / "labels")]
    argv += ["--storage", str(tmp / "st"), "--name", "cv"]
    code = main(argv)
    return SimpleNamespace(code=code, exp=tmp / "st" / "cv", data=tiny_data, space=space, argv=argv)


def test_every_trial_reports_the_mean_and_spread_over_folds_each_epoch(cv_search: SimpleNamespace) -> None:
    assert cv_search.code == 0
    df = pd.read_parquet(cv_search.exp / "results.parquet")
    assert df["trial_id"].nunique() == 5
    for _, g in df.groupby("trial_id"):
        assert list(g["epoch"]) == list(range(1, len(g) + 1))  # one row per epoch
    for m in ("val_rmse", "val_r2"):
        folds = df[[f"{m}_fold{j}" for j in range(K)]].to_numpy()
        assert np.isfinite(folds).all()
        np.testing.assert_allclose(df[m], folds.mean(axis=1), rtol=1e-12)
        np.testing.assert_allclose(df[f"{m}_sd"], folds.std(axis=1, ddof=1), rtol=1e-9)
        assert (df[f"{m}_sd"] > 0).all()  # the folds differ
    # the other metrics are means over folds too: val_mae lies between the folds' RMSE-bounded values
    assert (df["val_mae"] <= df["val_rmse"]).all()


def test_optuna_and_asha_act_on_the_mean(cv_search: SimpleNamespace) -> None:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    df = pd.read_parquet(cv_search.exp / "results.parquet")
    last = df.sort_values("epoch").groupby("trial_id").last()
    study = optuna.load_study(
        study_name="cv", storage=JournalStorage(JournalFileBackend(str(cv_search.exp / "optuna.journal")))
    )
    told = {t.user_attrs["ray_trial_id"]: t.value for t in study.get_trials() if t.value is not None}
    assert len(told) == 5
    for trial_id, value in told.items():
        assert value == pytest.approx(last.loc[trial_id, "val_rmse"])  # the mean at the trial's last epoch
        assert value != pytest.approx(last.loc[trial_id, "val_rmse_fold0"])
    # ASHA cut some trials; replaying the reported means in order gives exactly the cuts the live scheduler made
    cut = set(last.index[last["epoch"] < MAX_T])
    assert cut
    asha = ResumableASHA(str(cv_search.exp), max_t=MAX_T, grace_period=1, reduction_factor=2)
    asha.set_search_properties("val_rmse", "min")
    asha.rebuilt = True
    rows = [r for r in read_trial_rows(str(cv_search.exp)) if "epoch" in r]
    assert asha.rebuild(rows) == len(df)
    # (ASHA also has a rung at max_t, where every trial ends anyway: only the cuts before it are decisions)
    replayed = {t: int(e) for t, e in asha.stopped_at.items() if e < MAX_T}
    assert replayed == {t: int(last.loc[t, "epoch"]) for t in cut}


def test_folds_are_saved_reproducible_and_what_the_fold_models_trained_on(cv_search: SimpleNamespace) -> None:
    data = cv_search.data
    saved = read_folds(str(cv_search.exp))
    assert saved is not None and saved.k == K
    source = DataSource(str(data / "inputs"), str(data / "labels"), splits=("train", "val")).pinned()
    tiles = source.open().tiles
    again = build_assignment(saved.settings, tiles, str(data / "inputs"), dict(source.keys))
    assert again == saved  # the same tiles and settings give the same folds
    on_disk = json.loads((cv_search.exp / "cv_folds.json").read_text())
    assert [t["fold"] for t in on_disk["tiles"]] == list(saved.folds)

    best = read_cv_best(str(cv_search.exp))
    assert best is not None and best.folds == saved
    df = pd.read_parquet(cv_search.exp / "results.parquet")
    row = df.loc[df["val_rmse"].idxmin()]
    assert (best.trial_id, best.epoch) == (row["trial_id"], row["epoch"])
    assert best.value == pytest.approx(row["val_rmse"]) and best.value_sd == pytest.approx(row["val_rmse_sd"])
    raw = yaml.safe_load((cv_search.exp / "best.yaml").read_text())
    assert raw["cv"]["k"] == K and raw["cv"]["fold_values"] == pytest.approx(
        [row[f"val_rmse_fold{j}"] for j in range(K)]
    )
    assert best.retrain_config() == {**best.config, "epochs": best.epoch}
    assert best.config["epochs"] == MAX_T

    # The k fold models of the best (trial, epoch): each, evaluated on its fold's tiles (out_of_fold), gives that
    # fold's reported RMSE and R^2; each was normalised with its own training tiles' stats.
    states = best.fold_states()
    assert len(states) == K
    for j, state in enumerate(states):
        assert state["epoch"] == best.epoch and state["config"] == best.config
        assert state["norm"] == saved.train_norm(j).to_dict()
    oof = out_of_fold(states, tiles, saved)
    assert sorted(set(oof.tile)) == sorted(saved.names)  # every tile (each has labels here), once
    assert oof.y.size == sum(saved.labelled)
    for j in range(K):
        sel = oof.fold == j
        assert set(oof.tile[sel]) == set(saved.val_names(j))
        y, m = oof.y[sel], oof.mean[sel]
        rmse = math.sqrt(np.mean((y - m) ** 2))
        r2 = 1 - np.sum((y - m) ** 2) / np.sum((y - y.mean()) ** 2)
        assert rmse == pytest.approx(row[f"val_rmse_fold{j}"], rel=1e-5)
        assert r2 == pytest.approx(row[f"val_r2_fold{j}"], rel=1e-4, abs=1e-6)
    member = member_from_state(states[0], torch.device("cpu"))  # a fold model is an ensemble member as it is
    assert member.config.to_dict() == best.config


def _without_cv(cv_search: SimpleNamespace, exp: Path) -> Path:
    """A folder holding the cv search's best.yaml without its cv entry: what a search without cv leaves."""
    exp.mkdir()
    best = yaml.safe_load((cv_search.exp / "best.yaml").read_text())
    best.pop("cv")
    (exp / "best.yaml").write_text(yaml.safe_dump(best))
    return exp


def test_a_search_without_cv_has_no_cv_best(cv_search: SimpleNamespace, tmp_path: Path) -> None:
    assert read_cv_best(str(_without_cv(cv_search, tmp_path / "plain"))) is None


# -- interrupted and resumed -------------------------------------------------------------------------------------
def _mid_run_at_2(exp: Path) -> Any:
    def cond() -> Any:
        rows = [r for r in read_trial_rows(str(exp)) if "epoch" in r]
        return rows if any(r["epoch"] == 2 for r in rows) else None

    return cond


def test_resume_after_an_interruption_keeps_the_folds(tiny_data: Path, tmp_path: Path) -> None:
    """SIGINT in the middle of a 3-fold trial, then --resume: the saved folds are reused as saved (not made again),
    the interrupted trial goes on from its k-fold checkpoint, and the search ends complete."""
    space = tiny_space(
        experiment__num_samples=2,
        experiment__max_failures=1,
        scheduler__max_t=10,
        # No rung before epoch 6: a trial seen at epoch 2 is still running when the interrupt lands, even on a loaded
        # machine where it goes on for a few epochs before the search stops (at grace 3 one did not, under load).
        scheduler__grace_period=6,
        cv={"k": K, "block_size": 1, "seed": 4},
    )
    path = write_space(tmp_path / "space.yaml", space)
    exp = tmp_path / "st" / "exp"
    first = Search(tmp_path, tiny_data, path, resume=False, tag="cv_a")
    try:
        _wait_until(_mid_run_at_2(exp), first)
        first.proc.send_signal(signal.SIGINT)
        assert first.wait() == 130, first.output()[-3000:]
    finally:
        first.cleanup()
    rows_before = read_trial_rows(str(exp))
    latest: dict[str, int] = {}
    for r in rows_before:
        latest[r["trial_id"]] = max(latest.get(r["trial_id"], 0), r["epoch"])
    running = [t for t, e in latest.items() if e < 6]  # before the first rung: certainly not finished
    assert running
    # Mark the saved folds (a field that changes no fold): a resume that made them again would lose the mark.
    folds_file = exp / "cv_folds.json"
    saved = json.loads(folds_file.read_text())
    saved["positions"] += " [saved]"
    folds_file.write_text(json.dumps(saved, indent=1))
    before = folds_file.read_bytes()

    second = Search(tmp_path, tiny_data, path, resume=True, tag="cv_b")
    assert second.wait(timeout=400) == 0, second.output()[-3000:]
    out = second.output()
    assert f"cv: {K} folds of the train+val tiles, positions from tile names (tile_ROW_COL) [saved]" in out
    assert folds_file.read_bytes() == before  # reused as saved, not made again
    df = pd.read_parquet(exp / "results.parquet")
    assert df["trial_id"].nunique() == 2
    for _, g in df.groupby("trial_id"):
        assert list(g["epoch"]) == list(range(1, len(g) + 1))
    rows = read_trial_rows(str(exp))
    for t in running:  # continued from its checkpoint, never restarted at epoch 1
        after = sorted(r["epoch"] for r in rows if r["trial_id"] == t and r["wall_time"] > second.started)
        assert after and 1 < after[0] <= latest[t] + 1
    assert np.isfinite(df[[f"val_rmse_fold{j}" for j in range(K)]].to_numpy()).all()
    assert not math.isnan(df["val_rmse_sd"].max())


# -- final_train of a cross-validated search ----------------------------------------------------------------------
def _final(cv_search: SimpleNamespace, out: Path, *flags: str) -> dict[str, Any]:
    from tune_agb.final_train.cli import main as final_main

    code = final_main(["--experiment", str(cv_search.exp), "--out-dir", str(out), "--no-progress", *flags])
    assert code == 0
    return json.loads((out / "metrics.json").read_text())


def _oof(cv_search: SimpleNamespace) -> Any:
    data = cv_search.data
    tiles = DataSource(str(data / "inputs"), str(data / "labels"), splits=("train", "val")).open().tiles
    best = read_cv_best(str(cv_search.exp))
    return best, out_of_fold(best.fold_states(), tiles, best.folds)


def test_final_train_retrains_the_best_cv_config_on_train_and_val(cv_search: SimpleNamespace, tmp_path: Path) -> None:
    """Default for a cv search: the best config, for the epoch count the fold mean was best at, trained on train+val
    (normalised with their stats), the last epoch kept, the calibration fitted on the out-of-fold predictions."""
    from tune_agb.cv import merge_train_val
    from tune_agb.engine.calibration import fit_scale
    from tune_agb.engine.checkpoint import load_checkpoint
    from tune_agb.engine.data import compute_norm_stats

    out = tmp_path / "retrain"
    m = _final(cv_search, out)
    best, oof = _oof(cv_search)
    assert m["cv"] | {"calibration_fit_on": None} == {
        "final": "retrain",
        "k": K,
        "trial_id": best.trial_id,
        "epoch": best.epoch,
        "value": best.value,
        "value_sd": best.value_sd,
        "val_in_sample": True,
        "calibration_fit_on": None,
    }
    assert m["epochs"] == best.epoch and yaml.safe_load((out / "config.yaml").read_text())["epochs"] == best.epoch
    kept = load_checkpoint(out / "best.pt")
    assert kept["epoch"] == best.epoch == m["best_epoch"]  # the last epoch, whatever the (in-sample) val said
    data = cv_search.data
    tiles = DataSource(str(data / "inputs"), str(data / "labels")).open().tiles
    merged = merge_train_val(tiles)["train"]
    assert len(merged.names) == len(tiles["train"].names) + len(tiles["val"].names)
    assert kept["norm"] == compute_norm_stats(merged).to_dict() != compute_norm_stats(tiles["train"]).to_dict()
    cal = m["calibration"]
    assert (cal["split"], cal["n"]) == ("out-of-fold", oof.y.size)
    assert cal["scale"] == pytest.approx(fit_scale(oof.y, oof.mean, oof.var, best.config["loss"]), rel=1e-6)
    page = (out / "report" / "index.html").read_text()  # the report says val is not a held-out score here
    assert "val (in-sample: trained on)" in page and f"best trial {best.trial_id} at epoch {best.epoch}" in page


def test_final_train_calibrates_distance_on_the_out_of_fold_pixels(cv_search: SimpleNamespace, tmp_path: Path) -> None:
    """--calibration distance after a cv search: the widening's reference is every labelled train+val pixel (what the
    fold models were fitted on), and s is fitted on the out-of-fold pixels, each widened by its own bands' distance
    (read from the tile and position the fold model predicted)."""
    from tune_agb.cv import merge_train_val
    from tune_agb.engine.calibration import calibration_from_dict, fit_band_distance, fit_scale, labelled_bands

    out = tmp_path / "distance"
    m = _final(cv_search, out, "--calibration", "distance")
    best, oof = _oof(cv_search)
    cal = m["calibration"]
    assert (cal["method"], cal["split"], cal["n"]) == ("distance", "out-of-fold", oof.y.size)
    data = cv_search.data
    tiles = DataSource(str(data / "inputs"), str(data / "labels")).open().tiles
    both = merge_train_val(tiles)["train"]
    band_mean, band_icov, ref = fit_band_distance(labelled_bands(both.inputs, both.labels))
    assert cal["band_mean"] == pytest.approx(list(band_mean)) and cal["distance_ref"] == pytest.approx(ref)
    assert np.asarray(cal["band_icov"]) == pytest.approx(np.asarray(band_icov))
    where = {n: (s, i) for s in ("train", "val") for i, n in enumerate(tiles[s].names)}
    pixels = zip(oof.tile, oof.flat, strict=True)  # each out-of-fold pixel's bands, looked up one by one
    bands = np.stack([np.asarray(tiles[where[t][0]].inputs[where[t][1]]).reshape(14, -1)[:, f] for t, f in pixels], 1)
    g = calibration_from_dict(cal, "metrics.json").widening(bands)
    assert g.max() > 1.0  # some out-of-fold pixels lie further out than the train pixels' median
    s = fit_scale(oof.y, oof.mean, oof.var * g**2, best.config["loss"])
    assert cal["scale"] == pytest.approx(s, rel=1e-6)
    assert cal["scale"] != pytest.approx(fit_scale(oof.y, oof.mean, oof.var, best.config["loss"]), rel=1e-3)


def test_final_train_keeps_the_fold_models_as_an_ensemble(cv_search: SimpleNamespace, tmp_path: Path) -> None:
    """--cv-final folds: no training; the k fold models are the members (predict loads them), the test prediction is
    their combination, calibrated on the out-of-fold predictions."""
    from tune_agb.engine.checkpoint import load_checkpoint
    from tune_agb.engine.inference import member_checkpoints

    out = tmp_path / "folds"
    m = _final(cv_search, out, "--cv-final", "folds")
    best, oof = _oof(cv_search)
    states = best.fold_states()
    assert m["ensemble_of"] == "folds" and m["ensemble"] == K and m["epochs"] == best.epoch
    assert [r["fold"] for r in m["members"]] == list(range(K))
    doc = yaml.safe_load((out / "ensemble.yaml").read_text())
    assert (doc["kind"], doc["trial_id"], doc["epoch"]) == ("folds", best.trial_id, best.epoch)
    paths = member_checkpoints(out)
    assert len(paths) == K
    for path, state in zip(paths, states, strict=True):
        kept = load_checkpoint(path)
        assert kept["norm"] == state["norm"] and "seam_margin" in kept
        assert all(torch.equal(kept["model"][k], v) for k, v in state["model"].items())
    cal = m["calibration"]
    assert (cal["split"], cal["n"]) == ("out-of-fold", oof.y.size)
    pred = pd.read_parquet(out / "predictions.parquet")
    test = pred[pred["split"] == "test"]
    members = [r["test_rmse"] for r in m["members"]]
    assert m["test_n"] == len(test) > 0
    # the ensemble mean is the members' mean: no worse than the average member in squared error (convexity)
    assert m["test_rmse"] ** 2 <= np.mean(np.square(members)) + 1e-6


def test_final_train_cv_flag_errors(cv_search: SimpleNamespace, tmp_path: Path) -> None:
    from tune_agb.errors import TuneAgbError
    from tune_agb.final_train.cli import main as final_main

    plain = _without_cv(cv_search, tmp_path / "plain")
    cases = [
        (["--experiment", str(plain), "--cv-final", "folds"], "has no cv: section"),
        (["--experiment", str(cv_search.exp), "--cv-final", "folds", "--lr", "0.1"], "cannot change them"),
        (["--experiment", str(cv_search.exp), "--ensemble-top", "2", "--cv-final", "folds"], "--cv-final folds alone"),
        (["--cv-final", "retrain"], "needs --experiment"),
    ]
    for argv, expected in cases:
        with pytest.raises(TuneAgbError, match=expected):
            final_main([*argv, "--out-dir", str(tmp_path / "never")])
        assert not (tmp_path / "never").exists()  # nothing written


def test_a_cv_searchs_final_section_chooses_folds_and_a_flag_retrain(
    cv_search: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A space's final: {cv_final: folds} (here written into a copy of the search's folder) makes final_train
    --experiment keep the k fold models with no flag; --cv-final retrain overrides it (--print-config: nothing runs)."""
    import shutil

    from tune_agb.final_train.cli import main as final_main

    exp = tmp_path / "st" / "cv"
    shutil.copytree(cv_search.exp, exp)
    record = yaml.safe_load((exp / "search.yaml").read_text())
    record["space"]["final"] = {"cv_final": "folds", "calibration": "isotonic"}
    (exp / "search.yaml").write_text(yaml.safe_dump(record, sort_keys=False))

    def printed(*flags: str) -> dict[str, Any]:
        assert final_main(["--experiment", str(exp), "--print-config", *flags]) == 0
        return yaml.safe_load(capsys.readouterr().out)

    doc = printed()
    assert (doc["final"]["kind"], doc["final"]["members"], doc["final"]["cv_final"]) == ("folds", K, "folds")
    assert doc["final"]["from"]["cv_final"] == "search space" and doc["final"]["calibration"] == "isotonic"
    assert [m["fold"] for m in doc["members"]] == list(range(K))
    doc = printed("--cv-final", "retrain")
    assert (doc["final"]["kind"], doc["final"]["cv_final"], doc["final"]["from"]["cv_final"]) == (
        "single", "retrain", "flag/--set"
    )  # fmt: skip
    assert "retrained on train+val" in doc["source"]
    from tune_agb.errors import TuneAgbError  # an error about the recipe's value says where it came from

    with pytest.raises(TuneAgbError, match=r"cannot change them .*\(cv_final: folds: from the final: section of "):
        final_main(["--experiment", str(exp), "--lr", "0.1", "--out-dir", str(tmp_path / "never")])


def test_search_report_shows_the_spread_over_folds(cv_search: SimpleNamespace) -> None:
    """The report page of a cv search: the best-trials table has each trial's sd over folds at its best epoch, and a
    section gives the best trial's per-fold values with each fold's tiles and labelled pixels (cv_folds.json)."""
    import re

    from tune_agb.report import write_report

    text = write_report(cv_search.exp).read_text()
    df = pd.read_parquet(cv_search.exp / "results.parquet")
    row = df.loc[df["val_rmse"].idxmin()]
    table = text[text.index('<section id="best">') :]
    first = re.search(r'<tr class="best">(.*?)</tr>', table, re.S).group(1)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", first)
    assert cells[1:4] == [str(row["trial_id"]), f"{row['val_rmse']:.4g}", f"{row['val_rmse_sd']:.4g}"]
    folds = text[text.index('<section id="folds">') :]
    saved = read_folds(str(cv_search.exp))
    for j in range(K):
        labelled = sum(n for n, f in zip(saved.labelled, saved.folds, strict=True) if f == j)
        fold_row = re.search(rf"<tr><td class=\"num\">{j}</td>(.*?)</tr>", folds, re.S).group(1)
        assert re.findall(r"<td[^>]*>(.*?)</td>", fold_row)[1:3] == [
            f"{labelled}",
            f"{row[f'val_rmse_fold{j}']:.4g}",
        ]


def test_final_train_ensemble_top_of_a_cv_search(cv_search: SimpleNamespace, tmp_path: Path) -> None:
    """--ensemble-top K on a cv search: each of the K best configurations (by the fold mean) retrained on train+val
    for the epoch its fold mean was best at; the calibration fitted on the out-of-fold prediction of the ensemble
    (per pixel, the K trials' fold models that validated on it, combined like the members)."""
    from tune_agb.engine.calibration import fit_scale
    from tune_agb.engine.checkpoint import load_checkpoint
    from tune_agb.engine.inference import combine_members

    out = tmp_path / "top"
    m = _final(cv_search, out, "--ensemble-top", "5")  # every trial: some ran all MAX_T epochs, ASHA stopped some
    df = pd.read_parquet(cv_search.exp / "results.parquet")
    per_trial = df.loc[df.groupby("trial_id")["val_rmse"].idxmin()].sort_values("val_rmse").head(5)
    assert [r["trial_id"] for r in m["members"]] == list(per_trial["trial_id"])
    data = cv_search.data
    tiles = DataSource(str(data / "inputs"), str(data / "labels"), splits=("train", "val")).open().tiles
    best = read_cv_best(str(cv_search.exp))
    oofs = []
    last = df.groupby("trial_id")["epoch"].max()
    assert (last[per_trial["trial_id"]] < MAX_T).any()  # a trial ASHA stopped is among them (what the rule is for)
    for k, (_, row) in enumerate(per_trial.iterrows()):
        kept = load_checkpoint(out / "members" / f"member_{k:02d}" / "best.pt")
        # the epoch count its fold mean was best at if it ran the whole budget; else the budget (stopped early)
        assert kept["epoch"] == (row["epoch"] if last[row["trial_id"]] == MAX_T else MAX_T)
        ckpt = Path(row["trial_path"]) / row["checkpoint_dir_name"]
        states = load_checkpoint(ckpt / "checkpoint.pt")["folds"]
        oofs.append(out_of_fold(states, tiles, best.folds))
    mean, var = combine_members(*(torch.from_numpy(np.stack([getattr(o, a) for o in oofs])) for a in ("mean", "var")))
    cal = m["calibration"]
    assert (cal["split"], cal["n"]) == ("out-of-fold", oofs[0].y.size)
    assert cal["scale"] == pytest.approx(fit_scale(oofs[0].y, mean.numpy(), var.numpy()), rel=1e-6)
    assert m["cv"]["final"] == "retrain" and "of each of 5 trials" in m["cv"]["calibration_fit_on"]
    doc = yaml.safe_load((out / "ensemble.yaml").read_text())
    assert [mb["same_params_as"] for mb in doc["members"]] == [[]] * 5


def test_final_train_ensemble_top_with_seeds_of_a_cv_search(cv_search: SimpleNamespace, tmp_path: Path) -> None:
    """--ensemble-top 2 --ensemble 2 on a cv search: 4 members (2 configurations x 2 seeds); the calibration is the
    one --ensemble-top 2 fits, on the out-of-fold prediction of the 2 trials' fold models (each counted once, not
    once per seed)."""
    two = _final(cv_search, tmp_path / "k2", "--ensemble-top", "2", "--epochs", "1")
    m = _final(cv_search, tmp_path / "k2n2", "--ensemble-top", "2", "--ensemble", "2", "--epochs", "1")
    assert [(r["trial_id"], r["seed"]) for r in m["members"]] == [
        (two["members"][k]["trial_id"], two["members"][k]["seed"] + i) for k in (0, 1) for i in (0, 1)
    ]
    assert m["calibration"]["scale"] == pytest.approx(two["calibration"]["scale"], rel=1e-9)
    assert "of each of 2 trials" in m["cv"]["calibration_fit_on"]
    # the members with the first seed are the 2-member ensemble's, trained again the same way
    assert [r["test_rmse"] for r in m["members"][::2]] == pytest.approx([r["test_rmse"] for r in two["members"]])
