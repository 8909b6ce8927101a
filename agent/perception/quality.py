"""Image quality without a model: signal-to-noise ratio from the frame itself.

White noise (shot noise, read noise) is estimated from second differences along the fast-scan
axis, which remove smooth signal: for independent noise of standard deviation σ,
``d = x[j] - (x[j-1] + x[j+1]) / 2`` has variance 1.5 σ². A robust scale (MAD) keeps edges and
atoms from inflating it. The signal is what remains of the image variance. Fine structure near
the pixel pitch (atomic columns sampled at a few pixels) leaks into ``d``, so the estimate is
conservative: it under-reports the SNR of such images, never over-reports it.
"""

from __future__ import annotations

import math

import numpy as np

from drivers.frame import Frame
from drivers.observation import QualityEstimate

_MAD_TO_STD = 1.4826


class ImageQualityAssessor:
    """``assess(frame) -> QualityEstimate``; ignores NaN pixels (partial and sparse scans)."""

    name = "snr"
    version = "1"

    def assess(self, frame: Frame) -> QualityEstimate:
        data = np.asarray(frame.done_data, dtype=np.float64)
        if data.shape[1] < 3 or data.shape[0] < 1:
            return QualityEstimate(math.nan, math.nan, math.nan, self.name)
        d = data[:, 1:-1] - 0.5 * (data[:, :-2] + data[:, 2:])
        d = d[np.isfinite(d)]
        values = data[np.isfinite(data)]
        if d.size < 16 or values.size < 16:
            return QualityEstimate(math.nan, math.nan, math.nan, self.name)
        noise = _MAD_TO_STD * float(np.median(np.abs(d - np.median(d)))) / math.sqrt(1.5)
        total_var = float(np.var(values))
        signal = math.sqrt(max(total_var - noise * noise, 0.0))
        snr = signal / noise if noise > 0 else math.inf
        return QualityEstimate(snr, noise, signal, self.name)
