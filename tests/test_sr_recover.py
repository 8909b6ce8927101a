"""sr.recover() against the straightforward implementation it replaced (tiled inference with
blending, numpy σ, np.percentile and np.median): the same outputs up to float rounding on frames
that take each path (one pass, tiles, resampling) and on full, low-dose and partial scans."""

from __future__ import annotations

import math

import numpy as np
import pytest

from agent.perception.pixel_unet import PixelUNet
from agent.perception.registry import check_image, resample_to_pixel_size, tiled_inference
from agent.perception.tasks import sr
from agent.perception.tasks.stem_data import StemRecipe, simulate

# float32 carries 24 bits (eps 1.2e-7). The one-pass path skips the blend's multiply by the taper
# and divide by the same taper (two roundings), and torch's exp may round differently from
# numpy's (one more): a few eps. 2e-6 (~16 eps) admits that and nothing else; a wrong tile, a
# dropped temperature or scale changes the values by far more than 1e-3.
RTOL = 2e-6


def _reference(image: np.ndarray, pixel_size_nm: float) -> sr.Recovery:
    """sr.recover() as it was: blended tiles, numpy σ, full-array percentiles and median."""
    model, card = sr.load()
    arr = check_image(image, allow_nan=True, min_size=8)
    coverage = float(np.isfinite(arr).mean())
    work = resample_to_pixel_size(arr, pixel_size_nm, card)
    x, scale = sr.model_inputs(work)
    assert isinstance(model, PixelUNet)
    step = model.multiple()
    tile = min(sr.TILE_PX, -(-max(x.shape[1:]) // step) * step)
    out = tiled_inference(model, x, tile=tile, overlap=64, batch_size=4)
    logvar = np.clip(out[1], *sr.LOGVAR_RANGE)
    mean = out[0] * scale
    sigma = np.exp(0.5 * logvar) * float(card.training["temperature"]) * scale
    if work.shape != arr.shape:
        from skimage.transform import resize

        mean = resize(mean, arr.shape, order=1, preserve_range=True)
        sigma = resize(sigma, arr.shape, order=1, preserve_range=True)
    span = float(np.percentile(mean, 99.9) - np.percentile(mean, 0.1))
    relative = float(np.median(sigma) / span) if span > 0 else math.inf
    reject = not relative <= float(card.training["reject_relative_sigma"])
    return sr.Recovery(mean, sigma, relative, reject, "", coverage)


def _frame(shape: tuple[int, int], dwell_s: float, pattern: str, fraction: float) -> np.ndarray:
    recipe = StemRecipe(
        seed=4242,
        frames=1,
        shape_px=shape,
        dwell_s=(dwell_s, dwell_s),
        pixel_size_m=(0.25e-10, 0.25e-10),
        patterns=((pattern, fraction),),
    )
    return simulate(recipe, progress=False)[0].image


@pytest.mark.slow
@pytest.mark.parametrize(
    ("shape", "dwell_s", "pattern", "fraction", "pixel_nm"),
    [
        ((512, 512), 0.5e-6, "raster", 1.0, 0.025),  # quarter dose, one pass
        ((512, 512), 2e-6, "random", 0.05, 0.025),  # 1/20 scan, one pass
        ((128, 128), 2e-6, "spiral", 0.05, 0.025),  # a small frame, one pass
        ((200, 136), 0.5e-6, "raster", 1.0, 0.025),  # not square: padded tile
        ((640, 576), 2e-6, "lines", 0.05, 0.025),  # larger than a tile: blended tiles
        ((256, 256), 2e-6, "raster", 1.0, 0.02),  # resampled to the trained pixel size
    ],
)
def test_recover_matches_the_reference_implementation(
    shape: tuple[int, int], dwell_s: float, pattern: str, fraction: float, pixel_nm: float
) -> None:
    image = _frame(shape, dwell_s, pattern, fraction)
    new = sr.recover(image, pixel_nm, align=False)
    old = _reference(image, pixel_nm)
    assert new.image.shape == new.sigma.shape == image.shape
    assert new.image.dtype == new.sigma.dtype == np.float32
    span = float(np.ptp(old.image))
    np.testing.assert_allclose(new.image, old.image, rtol=RTOL, atol=RTOL * span)
    np.testing.assert_allclose(new.sigma, old.sigma, rtol=RTOL, atol=0)
    assert new.relative_uncertainty == pytest.approx(old.relative_uncertainty, rel=RTOL)
    assert (new.reject, new.coverage) == (old.reject, old.coverage)
