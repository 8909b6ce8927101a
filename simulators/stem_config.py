"""Configuration of the HAADF-STEM forward model: every physics and instrument parameter.

Defaults follow PHYSICS.md (an aberration-corrected 80 kV instrument imaging a MoS2 monolayer);
names carry their units. The default frame is 256 x 256 pixels over 6.4 nm (0.25 Å pixels,
finer than the Nyquist spacing λ / 4α ≈ 0.42 Å of the 25 mrad probe) at 2 µs per pixel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from drivers.errors import ConfigError
from simulators.stem_specimen import SPECIMENS, atomic_number

DEFAULT_SHAPE_PX = (256, 256)
DEFAULT_FOV_M = 6.4e-9
DEFAULT_DWELL_S = 2e-6
ELECTRONS_PER_PA_S = 6.241509074e6
"""Electrons per pA·s (1 / e)."""
BACKENDS = ("fast", "multislice")
"""Renderers of ``STEMConfig.backend``: the fast model, or abTEM (optional extra)."""


@dataclass(frozen=True)
class STEMConfig:
    """Physics and instrument parameters (units in the names).

    Specimen: ``specimen`` (``mos2``, ``ws2``, ``graphene``, ``srtio3``), ``dopant`` (the
    element of substitutions and adatoms; None: W in MoS2, Mo in WS2, Si in graphene, La in
    SrTiO3), ``thickness_cells`` (SrTiO3 [001] unit cells along the beam), ``lattice_angle_deg``
    (None: random per seed) and ``defect_density_scale`` (multiplies every defect probability).

    Optics: ``voltage_V``, ``convergence_rad`` (probe semi-angle α), ``defocus_m``, ``cs_m``,
    ``source_fwhm_m`` (effective source size, a Gaussian blur of the probe) and
    ``thermal_sigma_m`` (thermal smearing of the atoms).

    Contrast: an atom of atomic number Z scatters ``cross_section_ref_m2 * (Z / 42) ** z_exponent``
    onto the HAADF detector. The default (0.19 Å² for Mo) makes a MoS2 monolayer send about 3 %
    of the beam to the detector (PHYSICS.md: "a few %"). The model is linear in the number of
    atoms per column (no channelling): thick crystals are qualitatively right only, and the
    fraction is clipped at 1. The default SrTiO3 lamella (4 cells, 1.6 nm) peaks at ~0.58 on
    the Sr columns; for thicker crystals lower ``cross_section_ref_m2`` to stay below 1.

    Dose and detector: ``beam_current_A``; detected electrons are Poisson, times
    ``detector_gain`` (signal units per electron) plus Gaussian ``read_noise_counts``.

    Scan: ``drift_m_per_s`` (random direction per seed), ``line_jitter_m`` (RMS shift of each
    line along the fast axis), ``flyback_s`` (dead time per line), and the flyback distortion:
    the beam lags ``flyback_amplitude_m * exp(-t / flyback_decay_s)`` behind its commanded
    position ``t`` seconds into a line. ``class_radius_m`` is the radius of a defect's disc in
    the ground-truth class mask.

    Dopant-rich patches (:mod:`simulators.stem_patches`): ``patch_density_per_um2`` discs of
    radius ``patch_radius_m`` per µm² (0, the default: none) in which the substitution
    probabilities are multiplied by ``patch_substitution_scale`` (instead of
    ``defect_density_scale``): sparse clusters of defects of interest on a large sample.

    Backend: ``backend="fast"`` (the default) images with the fast ``|ψ|² ⊛ O`` model;
    ``"multislice"`` renders each frame's noise-free fraction with abTEM (an optional extra,
    ``pip install 'scopepilot[multislice]'``, looked for when the simulator is built) at the
    ideal probe positions: drift, line jitter and flyback lag are not applied to the image
    (time still passes as usual), and ``truth.extra["backend"]`` names the renderer.
    """

    specimen: str = "mos2"
    dopant: str | None = None
    thickness_cells: int = 4
    lattice_angle_deg: float | None = None
    defect_density_scale: float = 1.0
    voltage_V: float = 80e3
    convergence_rad: float = 25e-3
    defocus_m: float = 0.0
    cs_m: float = 1e-6
    source_fwhm_m: float = 0.4e-10
    thermal_sigma_m: float = 0.075e-10
    z_exponent: float = 1.7
    cross_section_ref_m2: float = 0.19e-20
    beam_current_A: float = 30e-12
    detector_gain: float = 1.0
    read_noise_counts: float = 0.3
    drift_m_per_s: float = 2e-10
    line_jitter_m: float = 0.1e-10
    flyback_s: float = 50e-6
    flyback_amplitude_m: float = 1.5e-10
    flyback_decay_s: float = 15e-6
    class_radius_m: float = 0.8e-10
    stage_range_m: float = 1e-6
    move_speed_m_per_s: float = 2e-6
    backend: str = "fast"
    patch_density_per_um2: float = 0.0
    patch_radius_m: float = 15e-9
    patch_substitution_scale: float = 15.0

    def __post_init__(self) -> None:
        if not isinstance(self.backend, str) or self.backend not in BACKENDS:
            raise ConfigError(
                f"STEMConfig.backend={self.backend!r} is unknown; choose one of {list(BACKENDS)}"
            )
        if not isinstance(self.specimen, str) or self.specimen not in SPECIMENS:
            raise ConfigError(
                f"STEMConfig.specimen={self.specimen!r} is unknown; choose one of "
                f"{sorted(SPECIMENS)}"
            )
        if self.dopant is not None:
            atomic_number(self.dopant)
        t = self.thickness_cells
        if isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= 200:
            raise ConfigError(f"STEMConfig.thickness_cells must be an int in 1..200, got {t!r}")
        for f in fields(self):
            if f.name in ("specimen", "dopant", "thickness_cells", "backend"):
                continue
            value = getattr(self, f.name)
            if value is None and f.name == "lattice_angle_deg":
                continue
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
            ):
                raise ConfigError(f"STEMConfig.{f.name} must be a finite number, got {value!r}")
        for name, low, high, why in _RANGES:
            value = getattr(self, name)
            if not low <= value <= high:
                raise ConfigError(
                    f"STEMConfig.{name}={value!r} is outside {low!r}..{high!r} ({why})"
                )
        for name in _POSITIVE:
            if getattr(self, name) <= 0:
                raise ConfigError(f"STEMConfig.{name} must be > 0, got {getattr(self, name)!r}")


_RANGES: tuple[tuple[str, float, float, str], ...] = (
    ("defect_density_scale", 0.0, 100.0, "a multiplier of the default defect densities"),
    ("voltage_V", 10e3, 1.5e6, "accelerating voltages of electron microscopes"),
    ("convergence_rad", 1e-3, 100e-3, "probe semi-angles, typically 20-35 mrad"),
    ("defocus_m", -2e-6, 2e-6, "defocus of an imaging probe"),
    ("cs_m", -10e-3, 10e-3, "spherical aberration, 0 (corrected) to a few mm"),
    ("source_fwhm_m", 0.0, 5e-10, "effective source sizes of field emitters"),
    ("thermal_sigma_m", 0.0, 0.5e-10, "thermal smearing, typically 0.05-0.1 Å"),
    ("z_exponent", 1.0, 2.0, "HAADF Z-contrast exponents, typically 1.6-1.9"),
    ("cross_section_ref_m2", 0.0, 1e-19, "HAADF cross-sections of one atom"),
    ("beam_current_A", 0.0, 1e-9, "probe currents, typically 5-100 pA"),
    ("detector_gain", 0.0, 1e6, "signal units per detected electron"),
    ("read_noise_counts", 0.0, 1e6, "detector read noise"),
    ("drift_m_per_s", 0.0, 1e-7, "specimen drift, typically a few Å/s"),
    ("line_jitter_m", 0.0, 1e-8, "line-to-line jitter"),
    ("flyback_s", 0.0, 1e-2, "flyback dead time per line"),
    ("flyback_amplitude_m", 0.0, 1e-8, "flyback lag at the start of a line"),
    ("flyback_decay_s", 0.0, 1e-2, "flyback settling time"),
    ("class_radius_m", 0.0, 1e-9, "defect disc radius in the class mask"),
    ("stage_range_m", 0.0, 1e-2, "stage travel"),
    ("move_speed_m_per_s", 0.0, 1e-2, "stage speed"),
    ("patch_density_per_um2", 0.0, 1e4, "dopant-rich patches per µm²"),
    ("patch_radius_m", 0.0, 1e-6, "radius of a dopant-rich patch"),
    ("patch_substitution_scale", 0.0, 1e3, "substitution probability multiplier in a patch"),
)
_POSITIVE = (
    "convergence_rad",
    "cross_section_ref_m2",
    "beam_current_A",
    "detector_gain",
    "flyback_decay_s",
    "stage_range_m",
    "move_speed_m_per_s",
    "patch_radius_m",
)


def electrons_per_pixel(beam_current_A: float, dwell_s: float) -> float:
    """Incident electrons per pixel: ``I · dwell / e`` (6.24e6 per pA·s)."""
    return beam_current_A * 1e12 * dwell_s * ELECTRONS_PER_PA_S
