"""Dose control by rule: lengthen the dwell when the image is too noisy, shorten it when the
signal-to-noise ratio is comfortably above target (less dose, faster frames).

Shot-noise SNR grows as the square root of the dwell, so one step of ``dwell_step`` = 2 changes
the SNR by about 1.41x; the dead band ``[target / tolerance, target * tolerance]`` with
``tolerance`` = 1.5 is wider than one step, so the rule settles instead of oscillating.
"""

from __future__ import annotations

import math

from drivers.commands import SetDwell
from drivers.observation import Observation


def dose_command(
    observation: Observation, *, target_snr: float, tolerance: float, dwell_step: float
) -> tuple[SetDwell | None, str]:
    """The dwell change the rule wants for this observation (or None) and why."""
    quality = observation.quality
    if quality is None or not math.isfinite(quality.snr):
        return None, "no image-quality estimate: dwell unchanged"
    dwell = observation.state.dwell_s
    low, high = observation.info.limits.dwell_s
    snr = quality.snr
    if snr < target_snr / tolerance:
        new = min(dwell * dwell_step, high)
        if new > dwell:
            return SetDwell(new, reason=f"SNR {snr:.2f} below target {target_snr:g}"), (
                f"SNR {snr:.2f} < {target_snr / tolerance:.2f}: dwell {dwell:.3g} -> {new:.3g} s"
            )
        return None, f"SNR {snr:.2f} below target but dwell already at its limit {high:.3g} s"
    if snr > target_snr * tolerance:
        new = max(dwell / dwell_step, low)
        if new < dwell:
            return SetDwell(new, reason=f"SNR {snr:.2f} above target {target_snr:g}"), (
                f"SNR {snr:.2f} > {target_snr * tolerance:.2f}: dwell {dwell:.3g} -> {new:.3g} s "
                "(less dose)"
            )
        return None, f"SNR {snr:.2f} above target; dwell already at its minimum {low:.3g} s"
    return None, f"SNR {snr:.2f} within target {target_snr:g} (x/÷{tolerance:g}): dwell kept"
