"""bench/overconfidence.py: the member combinations and sigma-factor estimators it compares on finished runs."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import overconfidence as oc


def test_combinations_differ_only_where_a_member_is_overconfident():
    # pixel 0: members agree and report similar variances; pixel 1: member 0 is far off and claims sigma 0.1
    means = np.array([[10.0, -1.0], [11.0, 30.0], [12.0, 31.0]])
    varis = np.array([[4.0, 0.01], [5.0, 50.0], [6.0, 60.0]])
    got = {rule: oc.combine(means, varis, rule) for rule in oc.COMBINES}
    np.testing.assert_array_equal(got.pop("best")[0], means[0])  # the first member alone
    for mean, var in got.values():
        assert 10.0 < mean[0] < 12.0 and 4.0 < var[0] < 7.0
    assert got["mean"][0][1] == pytest.approx(20.0)
    assert got["precision"][0][1] < 0.0  # the overconfident member takes the pixel
    # the floor: member 0 weighs at most 4 times the median member (weights 4 : 1 : 50/60)
    w = np.array([4 / 50, 1 / 50, 1 / 60])
    assert got["floor"][0][1] == pytest.approx((w * means[:, 1]).sum() / w.sum())
    assert got["random_effects"][0][1] > 15.0
    ws = 1 / np.sqrt(varis[:, 1])
    assert got["sigma"][0][1] == pytest.approx((ws * means[:, 1]).sum() / ws.sum())
    # the mixture's variance covers the members' spread in every rule but the precision one
    for rule in ("mean", "floor", "random_effects"):
        mean, var = got[rule]
        assert abs(30.0 - mean[1]) / np.sqrt(var[1]) < 2.0, rule
    z = {rule: abs(30.0 - got[rule][0][1]) / np.sqrt(got[rule][1][1]) for rule in ("precision", "sigma")}
    assert z["precision"] > 20 and 2 < z["sigma"] < z["precision"]  # sigma weights: in between, still taken over
    np.testing.assert_allclose(got["median"][0], [11.0, 30.0])  # the middle member, its own variance
    np.testing.assert_allclose(got["median"][1], [5.0, 50.0])
    # screen: member 0 lies 31 m from the median mean, more than 3 median sigmas (3 * sqrt(50)): the other two alike
    np.testing.assert_allclose(got["screen"][0], [11.0, 30.5])
    np.testing.assert_allclose(got["floor_linear"][0], got["floor"][0])  # the map is fitted in variants


def test_median_of_an_even_count_and_screen_keeps_all_when_none_is_near():
    means = np.array([[1.0, 0.0], [2.0, 100.0], [3.0, 0.0], [20.0, 100.0]])
    varis = np.ones_like(means)
    np.testing.assert_allclose(oc.combine(means, varis, "median")[0], [2.5, 50.0])  # the middle two alike
    # pixel 1: every member 50 m from the median mean (50) with sigma 1: none near, all kept
    np.testing.assert_allclose(oc.combine(means, varis, "screen")[0], [2.0, 50.0])  # pixel 0: 20 screened


def test_floor_linear_undoes_a_shrinkage_the_out_of_fold_pixels_show():
    rng = np.random.default_rng(1)
    truth = rng.uniform(0, 40, size=(2, 500))  # out-of-fold and test labels
    shrunk = 10 + 0.5 * (truth - 10)  # members that predict every label halfway to 10 m
    s = {"loss": "gaussian_nll", "oof_y": truth[0], "test_y": truth[1], "oof_g": 1.0, "test_g": 1.0}
    s |= {"oof_m": np.stack([shrunk[0]] * 3), "test_m": np.stack([shrunk[1]] * 3)}
    s |= {"oof_v": np.full((3, 500), 4.0), "test_v": np.full((3, 500), 4.0)}
    got = oc.variants(s)
    assert np.abs(got["floor", "q68"]["err"]).mean() > 5.0
    np.testing.assert_allclose(got["floor_linear", "q68"]["err"], 0.0, atol=1e-9)


@pytest.mark.parametrize("loss", ["gaussian_nll", "laplacian_nll"])
def test_estimators_agree_on_calibrated_samples_and_only_the_nll_one_follows_an_outlier(loss):
    rng = np.random.default_rng(0)
    sd = np.full(20_000, 2.0)
    r = (
        (rng.normal(size=sd.size) if loss == "gaussian_nll" else rng.laplace(scale=np.sqrt(0.5), size=sd.size))
        * 3.0
        * sd
    )
    for est in oc.ESTIMATORS:
        assert oc.factor(r, sd, loss, est) == pytest.approx(3.0, rel=0.04), est
    r[0] = 1e5  # one pixel 50,000 sigmas off
    assert oc.factor(r, sd, loss, "nll") > 4.0
    for est in ("median", "q68"):
        assert oc.factor(r, sd, loss, est) == pytest.approx(3.0, rel=0.04), est


def test_a_made_runaway_moves_only_the_last_members_test_pixels_and_floor_discounts_it():
    rng = np.random.default_rng(2)
    y = rng.uniform(5, 40, size=(2, 400))
    s = {"test_y": y[1], "oof_y": y[0], "oof_m": np.stack([y[0]] * 3), "oof_v": np.full((3, 400), 9.0)}
    s |= {"test_m": np.stack([y[1] + 1, y[1] - 1, y[1]]), "test_v": np.full((3, 400), 9.0)}
    known, unknown = oc.with_runaway(s, 20.0), oc.with_runaway(s, -20.0)
    for r in (known, unknown):
        np.testing.assert_array_equal(r["test_m"][:2], s["test_m"][:2])
        np.testing.assert_array_equal(r["oof_m"], s["oof_m"])
        assert 12 < np.sqrt(np.mean((r["test_m"][2] - y[1]) ** 2)) < 28  # the runaway: |N(0, 20)| below the label
    np.testing.assert_allclose(known["test_v"][2] - 9.0, (s["test_m"][2] - known["test_m"][2]) ** 2)
    np.testing.assert_array_equal(unknown["test_v"], s["test_v"])
    rmse = {(n, rule): np.sqrt(np.mean((oc.combine(r["test_m"], r["test_v"], rule)[0] - y[1]) ** 2))
            for n, r in (("known", known), ("unknown", unknown)) for rule in ("mean", "floor", "median")}  # fmt: skip
    assert rmse["known", "floor"] < 0.5 * rmse["known", "mean"]  # its grown variance discounts it
    assert rmse["unknown", "floor"] > 0.8 * rmse["unknown", "mean"]  # without that, the floor does not
    assert rmse["unknown", "median"] < 0.5 * rmse["unknown", "mean"]  # the median member is one of the other two
