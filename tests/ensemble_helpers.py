"""The ensemble combination written out in numpy, for tests that check what final_train and predict wrote."""

from __future__ import annotations

import numpy as np


def precision_mixture(means: np.ndarray, varis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(members, ...) means and variances -> the mixture with each member weighted by its precision at each pixel:
    its mean and variance (the members' variances plus the spread of their means)."""
    w = 1.0 / varis
    w = w / w.sum(0)
    mean = (w * means).sum(0)
    return mean, (w * (varis + (means - mean) ** 2)).sum(0)
