"""Losses against torch's own reference implementations, on labelled pixels only (issue 2, point 5)."""

from __future__ import annotations

import math

import pytest
import torch

from tune_agb.engine.losses import LOSSES, gaussian_nll, laplacian_nll, mae, mse, predicted_variance


def _batch(seed: int, shape: tuple[int, ...] = (3, 17, 23), labelled: float = 0.3):
    """Random mean, log-variance in [-2, 2] (variance >= e^-2, far above GaussianNLLLoss's eps=1e-6) and labels
    with a random NaN mask; returns (mean, logvar, target, mask)."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    logvar = torch.rand(shape, generator=g, dtype=torch.float64) * 4 - 2
    y = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1
    mask = torch.rand(shape, generator=g) < labelled
    mask.view(-1)[0] = True  # at least one labelled pixel
    target = torch.where(mask, y, torch.full_like(y, float("nan")))
    return mean, logvar, target, mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gaussian_nll_equals_torch_gaussian_nll_loss(seed: int) -> None:
    mean, logvar, target, mask = _batch(seed)
    ours = gaussian_nll(mean, logvar, target)
    # full=False drops the 0.5 log(2 pi) constant, as ours does; variances >= e^-2 never hit its eps clamp.
    ref = torch.nn.GaussianNLLLoss(full=False, eps=1e-6, reduction="mean")(mean[mask], target[mask], logvar[mask].exp())
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    # And the constant really is the only difference to the full negative log-likelihood.
    full = torch.nn.GaussianNLLLoss(full=True)(mean[mask], target[mask], logvar[mask].exp())
    torch.testing.assert_close(full - ours, torch.tensor(0.5 * math.log(2 * math.pi), dtype=torch.float64))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_laplacian_nll_equals_minus_laplace_log_prob(seed: int) -> None:
    mean, logvar, target, mask = _batch(seed)
    ours = laplacian_nll(mean, logvar, target)
    # losses.py parameterises the scale as b = exp(s / 2); -log_prob = log(2 b) + |y - mu| / b = ours + log 2.
    dist = torch.distributions.Laplace(mean[mask], (logvar[mask] / 2).exp())
    ref = -dist.log_prob(target[mask]).mean()
    torch.testing.assert_close(ours + math.log(2), ref, rtol=1e-12, atol=1e-12)
    # predicted_variance must be that Laplace's variance (2 b^2), so RMV means the same under every loss.
    torch.testing.assert_close(predicted_variance(logvar[mask], "laplacian_nll"), dist.variance)
    torch.testing.assert_close(predicted_variance(logvar, "gaussian_nll"), logvar.exp())


@pytest.mark.parametrize("seed", [0, 1])
def test_mse_mae_over_labelled_pixels_only(seed: int) -> None:
    mean, logvar, target, mask = _batch(seed)
    torch.testing.assert_close(mse(mean, logvar, target), torch.nn.functional.mse_loss(mean[mask], target[mask]))
    torch.testing.assert_close(mae(mean, logvar, target), torch.nn.functional.l1_loss(mean[mask], target[mask]))
    # mse/mae ignore the variance head entirely.
    other = torch.randn_like(logvar)
    assert mse(mean, other, target) == mse(mean, logvar, target)
    assert mae(mean, other, target) == mae(mean, logvar, target)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_unlabelled_pixels_do_not_count(name: str) -> None:
    """Changing the prediction where there is no label changes neither the loss nor the labelled gradient."""
    mean, logvar, target, mask = _batch(5)
    fn = LOSSES[name]
    a = fn(mean, logvar, target)
    mean2 = torch.where(mask, mean, mean + 100.0)
    logvar2 = torch.where(mask, logvar, -logvar)
    torch.testing.assert_close(fn(mean2, logvar2, target), a)
    # Averaged over labelled pixels, not over all pixels: duplicating the batch with no labels keeps the value.
    padded = torch.cat([target, torch.full_like(target, float("nan"))])
    torch.testing.assert_close(fn(torch.cat([mean, mean]), torch.cat([logvar, logvar]), padded), a)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_fully_unlabelled_batch_gives_zero_and_finite_grads(name: str) -> None:
    mean = torch.randn(2, 8, 9, requires_grad=True)
    logvar = torch.randn(2, 8, 9, requires_grad=True)
    target = torch.full((2, 8, 9), float("nan"))
    loss = LOSSES[name](mean, logvar, target)
    assert loss.item() == 0.0
    loss.backward()
    # mse/mae do not use the variance head: no gradient reaches it at all.
    lv_grad = logvar.grad if logvar.grad is not None else torch.zeros_like(logvar)
    assert torch.isfinite(mean.grad).all() and torch.isfinite(lv_grad).all()
    assert (mean.grad == 0).all() and (lv_grad == 0).all()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_nan_labels_never_leak_into_gradients(name: str) -> None:
    mean0, logvar0, target, mask = _batch(7, labelled=0.05)
    mean = mean0.clone().requires_grad_(True)
    logvar = logvar0.clone().requires_grad_(True)
    loss = LOSSES[name](mean, logvar, target)
    assert torch.isfinite(loss)
    loss.backward()
    lv_grad = logvar.grad if logvar.grad is not None else torch.zeros_like(logvar)
    assert torch.isfinite(mean.grad).all() and torch.isfinite(lv_grad).all()
    # Gradients are zero exactly where there is no label, non-zero (in the mean) where there is one.
    assert (mean.grad[~mask] == 0).all() and (lv_grad[~mask] == 0).all()
    assert (mean.grad[mask] != 0).any()
    # Same gradient as computing the loss on the labelled pixels alone (here via the reference gather).
    ref_mean = mean0.clone().requires_grad_(True)
    ref_logvar = logvar0.clone().requires_grad_(True)
    flat = LOSSES[name](ref_mean[mask], ref_logvar[mask], target[mask])
    flat.backward()
    torch.testing.assert_close(mean.grad, ref_mean.grad)
    if ref_logvar.grad is not None:
        torch.testing.assert_close(lv_grad, ref_logvar.grad)
    else:
        assert name in ("mse", "mae") and logvar.grad is None


def test_infinite_label_is_treated_as_unlabelled() -> None:
    mean, logvar, target, mask = _batch(9)
    bad = target.clone()
    bad[~mask] = float("inf")
    for fn in LOSSES.values():
        torch.testing.assert_close(fn(mean, logvar, bad), fn(mean, logvar, target))
