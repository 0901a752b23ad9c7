"""The ensemble combination written out in numpy, for tests that check what final_train and predict wrote."""

from __future__ import annotations

import numpy as np


def precision_mixture(means: np.ndarray, varis: np.ndarray, ratio: float | None = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """(members, ...) means and variances -> the mixture with each member weighted by its precision at each pixel,
    no member above ``ratio`` times a member with the median variance (None: unbounded): its mean and variance (the
    members' variances plus the spread of their means)."""
    w = 1.0 / (varis if ratio is None else np.maximum(varis, np.median(varis, axis=0) / ratio))
    w = w / w.sum(0)
    mean = (w * means).sum(0)
    return mean, (w * (varis + (means - mean) ** 2)).sum(0)
