"""The texture forest's features (tune_agb.texture, used by ``python -m tune_agb.baseline --texture-windows``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tune_agb.errors import TuneAgbError
from tune_agb.texture import Texture, parse_windows


def test_texture_is_each_bands_local_standard_deviation() -> None:
    """Against a direct loop: the population sd of the w x w window around each pixel of the reflect-padded band."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 9, 11, generator=g, dtype=torch.float64).float()
    out = Texture((3, 5))(x)
    assert out.shape == (2, 9, 9, 11)
    torch.testing.assert_close(out[:, :3], x)
    for k, w in enumerate((3, 5)):
        r = w // 2
        padded = np.pad(x.numpy().astype(np.float64), ((0, 0), (0, 0), (r, r), (r, r)), mode="reflect")
        want = np.empty(x.shape)
        for i in range(9):
            for j in range(11):
                want[..., i, j] = padded[..., i : i + w, j : j + w].std(axis=(-1, -2))
        torch.testing.assert_close(
            out[:, 3 * (k + 1) : 3 * (k + 2)].double(), torch.from_numpy(want), atol=1e-5, rtol=0
        )
    assert Texture(())(x) is x


@pytest.mark.parametrize(("value", "want"), [("3,7,15", "3,7,15"), (" 7 , 3", "7,3"), (7, "7"), ("", "")])
def test_parse_windows(value: object, want: str) -> None:
    assert ",".join(map(str, parse_windows(value))) == want


@pytest.mark.parametrize("bad", ["4", "1", "3,3", "a", "3;7", 7.0, True])
def test_parse_windows_errors_name_the_source(bad: object) -> None:
    with pytest.raises(TuneAgbError, match=r"^--texture-windows: 'texture_windows' must be distinct odd window sizes"):
        parse_windows(bad, source="--texture-windows")
