"""The HTML report (python -m tune_agb.report): a search's experiment folder built by hand in the exact format the
search writes (no Ray), a final_train out dir, every image a valid embedded PNG, and the page rendered by Chromium."""

from __future__ import annotations

import base64
import io
import json
import math
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from tune_agb.engine.calibration import Calibration, coverage
from tune_agb.errors import TuneAgbError, run_cli
from tune_agb.report import write_report
from tune_agb.report.cli import main
from tune_agb.runs import best_of, read_test_maps, write_best, write_results
from tune_agb.search.experiment import Experiment
from tune_agb.search.results import results_frame
from tune_agb.search.space import load_search_space

REPO = Path(__file__).resolve().parents[1]
SPACE_FILE = REPO / "search_spaces" / "demo.yaml"


def make_experiment(storage: Path, name: str = "demo", trials: int = 14, seed: int = 0) -> Path:
    """An experiment folder as a finished ASHA search leaves it (results.parquet, search.yaml, best.yaml), with
    trials sampled from the demo space, stopped at its ASHA rungs (first rung, next rung, max_t), and one errored
    trial."""
    space = load_search_space(SPACE_FILE)
    exp = Experiment.at(str(storage), name)
    exp.write_search({"space_file": str(SPACE_FILE), "space": space.to_dict(), "overrides": {}, "data": {}})
    root = Path(exp.uri)
    rng = np.random.default_rng(seed)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    rows, finals = [], []
    t0 = 1.7e9
    for i in range(trials):
        trial = study.ask()
        space.define_by_run(trial)
        cfg = dict(trial.params)
        # A response surface: lr matters most, then the optimizer; noise on top.
        quality = abs(math.log10(cfg["lr"] / 3e-3)) * 8 + (4 if cfg["optimizer"] == "sgd" else 0)
        final = 20 + quality + rng.normal(0, 1)
        sched = space.settings["scheduler"]
        first, second, top = sched["grace_period"], sched["grace_period"] * sched["reduction_factor"], space.max_t
        budget = top if i < 3 else (first if final > 28 else second if final > 24 else top)
        errored = i == 5
        budget = 3 if errored else budget
        trial_id = f"t{i:03d}"
        path = root / f"trainable_{trial_id}"
        path.mkdir(parents=True)
        if errored:
            (path / "error.txt").write_text("RuntimeError: out of memory\n")
        for epoch in range(1, budget + 1):
            val = final + 40 * math.exp(-epoch / 3) + rng.normal(0, 0.3)
            rows.append(
                {
                    "trial_id": trial_id,
                    "epoch": epoch,
                    "val_rmse": val,
                    "val_r2": 1 - val / 60,
                    "train_loss": val / 10,
                    "lr": cfg["lr"],
                    "wall_time": t0 + 30 * i + 5 * epoch,
                    "config": cfg | {"epochs": space.max_t},
                    "checkpoint_dir_name": f"checkpoint_{epoch - 1:06d}",
                    "_trial_path": str(path),
                }
            )
        finals.append(final)
    df = results_frame(rows, space)
    write_results(exp.uri, df)
    write_best(exp.uri, best_of(df, space, exp.uri, "in", "labels"))
    return root


def make_final_dir(out: Path, n: int = 4000, seed: int = 0, map_tiles: int = 0, calibrated: bool = False) -> Path:
    """A final_train out dir: metrics.json and predictions.parquet with the columns final_train writes, and with
    ``map_tiles`` > 0 test_maps.npz as final_train writes it (48 x 40 px tiles, 30 + 7k footprints in tile k).
    Without ``calibrated`` as written before calibration existed; with it, std scaled by 1.2 as final_train's
    default calibration would (``std_uncalibrated``, metrics ``calibration`` and ``uncalibrated``)."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True)
    cols: dict[str, list] = {k: [] for k in ("split", "tile", "row", "col", "label", "mean", "std")}
    metrics: dict[str, float] = {"best_epoch": 7, "epochs": 8, "ensemble": 1}
    for split in ("val", "test"):
        label = rng.gamma(2.0, 60.0, n)
        std = 10 + 0.2 * label
        mean = label + rng.normal(0, 1, n) * std * 1.2
        cols["split"] += [split] * n
        cols["tile"] += [f"tile_{k % 9}" for k in range(n)]
        cols["row"] += list(rng.integers(0, 64, n))
        cols["col"] += list(rng.integers(0, 64, n))
        cols["label"] += list(label)
        cols["mean"] += list(mean)
        cols["std"] += list(std)
        metrics |= {f"{split}_rmse": float(np.sqrt(np.mean((mean - label) ** 2))), f"{split}_n": n}
    if calibrated:
        cal = Calibration("scale", 1.2, split="val", n=n)
        cols["std_uncalibrated"] = cols["std"]
        cols["std"] = list(cal.std(np.asarray(cols["std"])))
        before = {k: v for k, v in metrics.items() if k.startswith(("val_", "test_"))}
        metrics |= {"val_nll": 4.5, "test_nll": 4.75, "calibration": cal.to_dict(), "uncalibrated": before}
        metrics["uncalibrated"] |= {"val_nll": 5.5, "test_nll": 5.75}
    pq.write_table(pa.table(cols), out / "predictions.parquet")
    (out / "metrics.json").write_text(json.dumps(metrics))
    if map_tiles:
        yy, xx = np.mgrid[:48, :40]
        mean = np.stack([120 + 60 * np.sin(xx / (6 + k)) * np.cos(yy / 9) for k in range(map_tiles)])
        label = np.full(mean.shape, np.nan)
        for k in range(map_tiles):
            flat = rng.choice(48 * 40, 30 + 7 * k, replace=False)
            label[k].flat[flat] = mean[k].flat[flat] + rng.normal(0, 25, flat.size)
        names = np.asarray([f"tile_{k}_{k}" for k in range(map_tiles)])
        f32 = {"mean": mean, "std": 10 + 0.2 * mean, "label": label}
        np.savez(out / "test_maps.npz", names=names, **{k: v.astype(np.float32) for k, v in f32.items()})
    return out


def images(text: str) -> list[Image.Image]:
    """Every <img> of the page, each required to be an embedded PNG that Pillow reads."""
    tags = re.findall(r"<img\b[^>]*>", text)
    out = []
    for tag in tags:
        m = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', tag)
        assert m, f"not an embedded PNG: {tag[:120]}"
        img = Image.open(io.BytesIO(base64.b64decode(m.group(1), validate=True)))
        img.load()
        assert img.format == "PNG" and img.width > 100 and img.height > 100
        out.append(img)
    return out


def assert_self_contained(text: str) -> None:
    assert "<script" not in text
    assert not re.search(r'(src|href)="(?!data:|#)', text), "a reference outside the page"


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_experiment(tmp_path_factory.mktemp("storage"))


@pytest.fixture(scope="module")
def search_page(experiment: Path) -> Path:
    return write_report(experiment)


@pytest.mark.slow
def test_search_report(experiment: Path, search_page: Path) -> None:
    assert search_page == experiment / "report" / "index.html"
    text = search_page.read_text()
    assert_self_contained(text)
    for sid in ("curves", "history", "importance", "slices", "best"):
        assert f'<section id="{sid}">' in text, sid
    assert len(images(text)) == 4  # curves, history, importance, slices (one figure)
    assert "Parameter importances unavailable" not in text
    # The best trial leads the table (marked), with its differences from the space's base config.
    df = pd.read_parquet(experiment / "results.parquet")
    best = df.loc[df["val_rmse"].idxmin()]
    table = text[text.index('<section id="best">') :]
    first_row = re.search(r'<tr class="best">(.*?)</tr>', table, re.S)
    assert first_row and f"<td>{best['trial_id']}</td>" in first_row.group(1)
    assert f"{best['val_rmse']:.4g}" in first_row.group(1)
    base = load_search_space(SPACE_FILE).base_config()
    assert f"lr = {best['config/lr']:.4g} (base {base.lr:.4g})" in first_row.group(1)
    assert "optimizer =" not in first_row.group(1) or best["config/optimizer"] != base.optimizer  # only differences
    assert "1 errored" in text and "stopped early" in text


def test_rebuilt_study_holds_each_trials_params_and_best_value(experiment: Path) -> None:
    """The study the importances are computed on: one trial per search trial with a result, its value the best of
    the metric over its epochs in results.parquet, its params as sampled (the conditional one only where sampled),
    each in the space's domain; the importances cover the searched params."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    from tune_agb.report.search_page import load_trials, param_importances, rebuild_study

    space = load_search_space(SPACE_FILE)
    df = pd.read_parquet(experiment / "results.parquet")
    trials = load_trials(df, space)
    assert [t.status for t in trials].count("errored") == 1
    assert {t.status for t in trials} == {"completed", "stopped early", "errored"}
    study = rebuild_study(trials, space)
    by_id = {t.user_attrs["trial_id"]: t for t in study.trials}
    assert set(by_id) == set(df["trial_id"])
    searched = [p.name for p in space.params]
    for tid, rows in df.groupby("trial_id"):
        st, first = by_id[tid], rows.iloc[0]
        assert st.value == rows["val_rmse"].min() and st.value in set(rows["val_rmse"])
        sampled = {n: first[f"config/{n}"] for n in searched if not pd.isna(first[f"config/{n}"])}
        assert st.params.keys() == sampled.keys()
        for name, value in sampled.items():
            assert st.params[name] == (pytest.approx(value) if isinstance(value, float) else value), (tid, name)
        assert ("momentum" in st.params) == (st.params["optimizer"] == "sgd"), tid
    lr = study.trials[0].distributions["lr"]
    assert isinstance(lr, FloatDistribution) and lr.log and (lr.low, lr.high) == (3e-4, 1e-2)
    assert study.trials[0].distributions["base_channels"] == CategoricalDistribution([4, 8])
    imp, _ = param_importances(study)
    assert set(imp) == set(searched)
    assert sum(imp.values()) == pytest.approx(1.0)
    assert next(iter(imp)) == "lr"  # the response surface depends most on lr


def maps_of(text: str) -> list[tuple[str, int]]:
    """``(tile name, footprint count)`` of each tile figure in the page's maps section."""
    section = text[text.index('<section id="maps">') :]
    return [
        (name, int(n))
        for name, n in re.findall(
            r'<h3 class="tile">([^<]+)</h3><img alt="maps of test tile \1"[^>]*><p class="note">(\d+) labelled',
            section,
        )
    ]


@pytest.mark.slow
def test_final_report(tmp_path: Path) -> None:
    out = make_final_dir(tmp_path / "final", map_tiles=3)
    page = write_report(out, unit="Mg/ha")
    text = page.read_text()
    assert_self_contained(text)
    for sid in ("metrics", "scatter", "residuals", "calibration", "maps"):
        assert f'<section id="{sid}">' in text, sid
    imgs = images(text)
    assert len(imgs) == 4 + 3  # one figure per tile, after the four model figures
    assert maps_of(text) == [("tile_0_0", 30), ("tile_1_1", 37), ("tile_2_2", 44)]
    assert all(i.width > 800 for i in imgs[4:])  # mean and σ side by side, readable at page width
    metrics = json.loads((out / "metrics.json").read_text())
    assert f"{metrics['test_rmse']:.4g}" in text and "Mg/ha" in text


def test_final_report_without_maps_notes_it(tmp_path: Path) -> None:
    out = make_final_dir(tmp_path / "final", n=300)
    text = write_report(out).read_text()
    maps = text[text.index('<section id="maps">') :]
    assert "No test_maps.npz in this folder" in maps and "<img" not in maps
    assert len(images(text)) == 4


def metrics_rows(text: str) -> list[list[str]]:
    """The cells of the metrics table (the first table of the metrics section)."""
    section = text[text.index('<section id="metrics">') :]
    table = section[: section.index("</table>")]
    return [re.findall(r"<td[^>]*>([^<]*)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", table, re.S)[1:]]


def test_final_report_shows_metrics_before_and_after_calibration(tmp_path: Path) -> None:
    out = make_final_dir(tmp_path / "final", n=300, calibrated=True)
    text = write_report(out).read_text()
    rows = metrics_rows(text)
    assert [r[0] for r in rows] == ["val, before calibration", "val", "test, before calibration", "test"]
    nll = [r[[h for h in re.findall(r"<th>([^<]*)</th>", text)].index("nll")] for r in rows]
    assert nll == ["5.5", "4.5", "5.75", "4.75"]
    assert "scale: sigma x 1.2 (fitted on 300 val pixels)" in text
    # an out dir written before calibration existed: one row per split, no calibration setting
    old = write_report(make_final_dir(tmp_path / "old", n=300)).read_text()
    assert [r[0] for r in metrics_rows(old)] == ["val", "test"] and "sigma x" not in old
    # a malformed calibration record is one error naming the file and the field
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["calibration"]["scale"] = 0
    (out / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(TuneAgbError, match=re.escape(f"{out / 'metrics.json'}: 'calibration': 'scale' must be")):
        write_report(out)


def reliability_curves(pred: pd.DataFrame, loss: str) -> dict[str, tuple[str, np.ndarray, np.ndarray]]:
    """``{label: (line style, nominal levels, observed coverage)}`` of the reliability diagram of ``pred``."""
    from tune_agb.report.final_page import reliability_figure

    ax = reliability_figure(pred, loss).axes[0]
    return {ln.get_label(): (ln.get_linestyle(), ln.get_xdata(), ln.get_ydata()) for ln in ax.get_lines()}


def test_reliability_diagram_before_and_after_calibration(tmp_path: Path) -> None:
    # errors 1.2 x the stored std, and a calibration that scales std by 1.2: calibrated after, sigma too small before
    pred = pd.read_parquet(make_final_dir(tmp_path / "cal", n=20_000, calibrated=True) / "predictions.parquet")
    curves = reliability_curves(pred, "gaussian_nll")
    styles = {name: style for name, (style, _, _) in curves.items()}
    assert styles == {"val, before calibration": "--", "val": "-", "test, before calibration": "--", "test": "-",
                      "ideal": ":"}  # fmt: skip
    for split in ("val", "test"):
        _, levels, after = curves[split]
        _, _, before = curves[f"{split}, before calibration"]
        assert np.abs(after - levels).max() < 0.02  # on the diagonal
        assert np.all(before[1:-1] < levels[1:-1] - 0.01)  # below it: sigma too small
    # written before calibration existed (no std_uncalibrated): one solid curve per split
    old = pd.read_parquet(make_final_dir(tmp_path / "old", n=300) / "predictions.parquet")
    assert list(reliability_curves(old, "gaussian_nll")) == ["val", "test", "ideal"]


@pytest.mark.parametrize("loss", ["gaussian_nll", "laplacian_nll"])
def test_reliability_diagram_uses_the_runs_predictive_distribution(loss: str) -> None:
    # errors drawn from the run's own distribution with the predicted std: calibrated by its intervals only
    rng = np.random.default_rng(3)
    std = rng.uniform(5, 20, 40_000)
    noise = rng.laplace(0, 1 / math.sqrt(2), std.size) if loss == "laplacian_nll" else rng.normal(0, 1, std.size)
    label = rng.uniform(50, 150, std.size)
    pred = pd.DataFrame({"split": "val", "label": label, "mean": label + noise * std, "std": std})
    other = "gaussian_nll" if loss == "laplacian_nll" else "laplacian_nll"
    _, levels, own = reliability_curves(pred, loss)["val"]
    _, _, wrong = reliability_curves(pred, other)["val"]
    assert np.abs(own - levels).max() < 0.015
    assert np.abs(wrong - levels).max() > 0.03
    from tune_agb.report.final_page import reliability_figure

    shape = "Laplacian" if loss == "laplacian_nll" else "Gaussian"
    assert shape in reliability_figure(pred, loss).axes[0].get_title()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda z: {k: v for k, v in z.items() if k != "std"}, "missing array std"),
        (lambda z: z | {"label": z["label"][:, :-1]}, "'label' must be float"),
        (lambda z: z | {"mean": z["mean"][0]}, "'mean' must be a float array"),
        (lambda z: z | {"names": z["names"][:1]}, "'names' must be 2 strings"),
        (lambda z: z | {"std": z["std"].astype(np.int32)}, "'std' must be float"),
    ],
    ids=["missing", "shape", "ndim", "names", "dtype"],
)
def test_malformed_test_maps(tmp_path: Path, change: Callable[[dict], dict], message: str) -> None:
    out = make_final_dir(tmp_path / "final", n=300, map_tiles=2)
    file = out / "test_maps.npz"
    with np.load(file) as z:
        good = dict(z)
    assert read_test_maps(out).names == ["tile_0_0", "tile_1_1"]
    np.savez(file, **change(good))
    with pytest.raises(TuneAgbError, match=re.escape(f"{file}: {message}")):
        read_test_maps(out)


def test_unreadable_test_maps_fail_the_cli_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = make_final_dir(tmp_path / "final", n=300)
    (out / "test_maps.npz").write_bytes(b"PK\x03\x04 cut short")
    assert run_cli(main, [str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{out / 'test_maps.npz'}: not a readable .npz" in err and len(err.splitlines()) == 1
    assert not (out / "report" / "index.html").exists()


@pytest.mark.slow
def test_report_of_a_real_final_train_run(tiny_data: Path, tmp_path: Path) -> None:
    from tune_agb.final_train.cli import main as final_train

    out = tmp_path / "run"
    (tmp_path / "small.yaml").write_text(yaml.safe_dump({"base_channels": 4, "depth": 2, "batch_size": 4}))
    argv = ["--config", str(tmp_path / "small.yaml"), "--input-dir", str(tiny_data / "inputs")]
    argv += ["--label-dir", str(tiny_data / "labels"), "--out-dir", str(out), "--no-progress", "--device", "cpu"]
    assert run_cli(final_train, [*argv, "--epochs", "2"]) == 0
    assert run_cli(main, [str(out)]) == 0
    text = (out / "report" / "index.html").read_text()
    with np.load(out / "test_maps.npz") as z:
        names, label = [str(n) for n in z["names"]], z["label"]
    assert 1 <= len(names) <= 4
    assert len(images(text)) == 4 + len(names)  # the model figures, then one map figure per test tile
    assert maps_of(text) == [(n, int(np.isfinite(lab).sum())) for n, lab in zip(names, label, strict=True)]
    metrics = json.loads((out / "metrics.json").read_text())
    assert f"{metrics['val_rmse']:.4g}" in text


def test_coverage_of_central_intervals() -> None:
    rng = np.random.default_rng(1)
    std = rng.uniform(1, 5, 200_000)
    label = rng.normal(0, 1, std.size) * std
    levels = [0.5, 0.9, 0.95]
    np.testing.assert_allclose(coverage(label, np.zeros_like(label), std, levels), levels, atol=0.005)
    # std half the truth: the 95% interval is ±0.98 true σ and holds about 67% of the labels
    assert coverage(label, np.zeros_like(label), std / 2, [0.95])[0] == pytest.approx(0.6729, abs=0.005)


def test_not_a_report_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(TuneAgbError, match="neither a search"):
        write_report(tmp_path)
    assert run_cli(main, [str(tmp_path)]) == 2
    assert "neither a search" in capsys.readouterr().err


def html_meta(text: str) -> str:
    m = re.search(r'<p class="meta">(.*?)</p>', text, re.S)
    assert m
    return m.group(1).replace("&#x27;", "'")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Some regimes for parameter")  # PED-ANOVA on 6 trials
def test_report_of_a_file_uri_is_read_and_written_through_its_location(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # file:// is the URI this machine can test (no network): read and written through pyarrow's filesystem, as s3/gs.
    root = make_experiment(tmp_path / "storage", name="remote", trials=6)
    uri = root.as_uri()
    assert run_cli(main, [uri + "/"]) == 0
    assert capsys.readouterr().out.strip() == f"{uri}/report/index.html"
    text = (root / "report" / "index.html").read_text()
    assert_self_contained(text)
    assert len(images(text)) == 4 and "Search report: remote" in text
    assert html_meta(text).startswith(f"{uri} — 6 trials") and "1 errored" in html_meta(text)  # trial folders read
    assert sorted(p.name for p in (root / "report").iterdir()) == ["index.html"]


def test_file_uri_errors_name_the_uri(tmp_path: Path) -> None:
    with pytest.raises(TuneAgbError, match=f"^{re.escape(tmp_path.as_uri())}: neither a search"):
        write_report(tmp_path.as_uri())
    out = make_final_dir(tmp_path / "final", n=300)
    (out / "test_maps.npz").write_bytes(b"not a zip")
    with pytest.raises(TuneAgbError, match=f"^{re.escape(out.as_uri())}/test_maps.npz: not a readable .npz"):
        write_report(out.as_uri())
    assert not (out / "report").exists()
    (out / "test_maps.npz").unlink()
    assert write_report(out.as_uri()) == f"{out.as_uri()}/report/index.html"
    assert "maps skipped" in (out / "report" / "index.html").read_text()


CHECK_SCRIPT = """<script>
window.__errors = [];
window.onerror = function (msg) { window.__errors.push(String(msg)); };
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.length > 0 && imgs.every(function (i) { return i.complete && i.naturalWidth > 0; });
  document.body.setAttribute("data-images", imgs.length + (ok ? " ok" : " broken"));
  document.body.setAttribute("data-errors", window.__errors.length + ":" + window.__errors.join("|"));
});
</script>"""


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("chromium is not installed (CI installs it)")
    return path


def chromium_args(profile: Path) -> list[str]:
    return ["--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}", "--window-size=1280,2000"]


def assert_chromium_loads_every_image(chromium: str, page: Path, tmp_path: Path) -> int:
    """Chromium opens the page: every image decodes and no script error is raised; returns the image count."""
    text = page.read_text()
    checked = tmp_path / "checked.html"  # the page plus a probe script (the report itself has no script)
    checked.write_text(text.replace("<head>", "<head>\n" + CHECK_SCRIPT, 1))
    dom = subprocess.run(
        [chromium, *chromium_args(tmp_path / "p1"), "--dump-dom", checked.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    n = len(re.findall(r"<img\b", text))
    assert f'data-images="{n} ok"' in dom.stdout, re.findall(r"<body[^>]*>", dom.stdout)
    assert 'data-errors="0:"' in dom.stdout, re.findall(r"<body[^>]*>", dom.stdout)
    return n


@pytest.mark.slow
def test_chromium_renders_final_report_with_maps(tmp_path: Path) -> None:
    chromium = _chromium()
    page = write_report(make_final_dir(tmp_path / "final", n=1000, map_tiles=4), unit="Mg/ha")
    assert assert_chromium_loads_every_image(chromium, page, tmp_path) == 4 + 4


@pytest.mark.slow
def test_chromium_renders_search_report(search_page: Path, tmp_path: Path) -> None:
    chromium = _chromium()
    assert assert_chromium_loads_every_image(chromium, search_page, tmp_path) == 4

    shot = tmp_path / "shot.png"
    res = subprocess.run(
        [chromium, *chromium_args(tmp_path / "p2"), f"--screenshot={shot}", search_page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    img = Image.open(shot).convert("L")
    lo, hi = img.getextrema()
    assert hi - lo > 100  # not blank
    assert len(img.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 50
