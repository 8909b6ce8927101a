"""The electron probe of a STEM by Fourier optics, and the incoherent imaging kernel.

Lengths here are in ångström (suffix ``_ang``) and spatial frequencies in 1/Å (``_per_ang``);
the public simulator API converts to metres. The probe wave is

    ψ(r) = FT⁻¹[A(k) exp(−i χ(k))],   A(k) = 1 for |k| λ ≤ α, else 0,
    χ(k) = π λ Δf k² + (π/2) C_s λ³ k⁴,

and the probe intensity ``P = |ψ|²`` is normalised to ∫P d²r = 1 (units 1/Å²). Because the
aperture and χ depend on |k| only, P is radially symmetric. The incoherent image of a specimen
is ``P ⊛ O`` with ``O = Σ σ_i G(r − r_i)``; both the thermal smearing of the atoms and the
effective source size are Gaussians, so the whole imaging kernel is ``K = P ⊛ G_σ`` with
``σ² = σ_thermal² + σ_source²``. :class:`ImagingKernel` holds K as two radial tables: its
Fourier transform ``K̂(k)`` (exactly zero beyond ``2α/λ``, the support of P̂) and ``K(r)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.constants as const
import scipy.fft
import scipy.special

ANG = 1e-10
"""One ångström in metres."""


def wavelength_m(voltage_V: float) -> float:
    """Relativistic electron wavelength ``h / sqrt(2 m0 e E (1 + e E / (2 m0 c²)))`` in metres.

    >>> round(wavelength_m(80e3) / 1e-10, 4)
    0.0418
    """
    energy_J = const.e * voltage_V
    momentum = math.sqrt(
        2.0 * const.m_e * energy_J * (1.0 + energy_J / (2.0 * const.m_e * const.c**2))
    )
    return const.h / momentum


@dataclass(frozen=True)
class ProbeOptics:
    """Probe-forming optics: ``voltage_V``, ``convergence_rad`` (semi-angle α), ``defocus_m``
    (Δf; negative is underfocus in this sign convention) and ``cs_m`` (spherical aberration)."""

    voltage_V: float = 80e3
    convergence_rad: float = 25e-3
    defocus_m: float = 0.0
    cs_m: float = 1e-6

    @property
    def wavelength_ang(self) -> float:
        return wavelength_m(self.voltage_V) / ANG

    @property
    def aperture_per_ang(self) -> float:
        """Radius of the aperture in reciprocal space, ``α / λ`` (1/Å)."""
        return self.convergence_rad / self.wavelength_ang

    def chi(self, k_per_ang: np.ndarray) -> np.ndarray:
        """Aberration phase χ(k) in radians for spatial frequencies ``k_per_ang``."""
        lam = self.wavelength_ang
        df = self.defocus_m / ANG
        cs = self.cs_m / ANG
        k2 = np.asarray(k_per_ang, dtype=np.float64) ** 2
        return math.pi * lam * df * k2 + 0.5 * math.pi * cs * lam**3 * k2 * k2


def probe_grid(optics: ProbeOptics) -> tuple[np.ndarray, float]:
    """``(N, N)`` float64 probe intensity centred at ``[0, 0]`` (FFT order) and the pixel in Å.

    The grid samples at ``λ / (8 α)``, twice finer than the Nyquist limit of ``|ψ|²``, and is
    wide enough to hold the probe tails of a defocused or aberrated probe.
    """
    k_ap = optics.aperture_per_ang
    dx = 1.0 / (8.0 * k_ap)  # λ / (8 α): half the Nyquist spacing of P (support 2 α / λ)
    blur_ang = abs(optics.defocus_m / ANG) * optics.convergence_rad
    # Geometric spread of an aberrated probe: |∂χ/∂k| / 2π at the aperture edge.
    lam = optics.wavelength_ang
    spread_ang = blur_ang + (optics.cs_m / ANG) * lam**3 * k_ap**3
    width_ang = max(64.0, 6.0 * spread_ang + 40.0)
    n = int(2 ** math.ceil(math.log2(width_ang / dx)))
    n = min(max(n, 256), 2048)
    k = scipy.fft.fftfreq(n, d=dx)
    kk = np.hypot(k[:, None], k[None, :])
    pupil = np.where(kk <= k_ap, np.exp(-1j * optics.chi(kk)), 0.0)
    psi = scipy.fft.ifft2(pupil)
    intensity = np.abs(psi) ** 2
    intensity /= intensity.sum() * dx * dx
    return intensity, dx


@dataclass(frozen=True)
class ProbeProfile:
    """Radial facts of the probe intensity: FWHM and d50 (diameter holding half the current)."""

    fwhm_ang: float
    d50_ang: float


def probe_profile(optics: ProbeOptics) -> ProbeProfile:
    """FWHM and d50 of the probe intensity (no source size), in Å."""
    intensity, dx = probe_grid(optics)
    n = intensity.shape[0]
    centred = scipy.fft.fftshift(intensity)
    idx = np.arange(n) - n // 2
    rr = np.hypot(idx[:, None], idx[None, :]) * dx
    order = np.argsort(rr, axis=None)
    r_sorted = rr.ravel()[order]
    cum = np.cumsum(centred.ravel()[order]) * dx * dx
    d50 = 2.0 * float(np.interp(0.5, cum, r_sorted))
    # FWHM from the profile along x (the probe is radially symmetric).
    line = centred[n // 2, n // 2 :]
    peak = line[0]
    below = np.nonzero(line < 0.5 * peak)[0]
    if below.size == 0:
        fwhm = float("nan")
    else:
        j = int(below[0])
        frac = (line[j - 1] - 0.5 * peak) / (line[j - 1] - line[j])
        fwhm = 2.0 * (j - 1 + frac) * dx
    return ProbeProfile(fwhm_ang=fwhm, d50_ang=d50)


class ImagingKernel:
    """The incoherent HAADF imaging kernel ``K = |ψ|² ⊛ G_σ`` as radial tables.

    ``khat(k)`` is its Fourier transform (``K̂(0) = 1``), ``value(r)`` the kernel itself in
    1/Å², both for radii / frequencies in Å / (1/Å). ``cutoff_ang`` is the radius beyond which
    local corrections (defects) are neglected.
    """

    def __init__(self, optics: ProbeOptics, *, blur_sigma_ang: float) -> None:
        self.optics = optics
        self.blur_sigma_ang = float(blur_sigma_ang)
        intensity, dx = probe_grid(optics)
        n = intensity.shape[0]
        phat = scipy.fft.fft2(intensity).real * dx * dx  # P̂ on the FFT grid, P̂(0) = 1
        k_axis = np.arange(n // 2 + 1) / (n * dx)
        # Average the +kx and +ky axes to cancel the small anisotropy of a square grid.
        phat_axis = 0.5 * (phat[0, : n // 2 + 1] + phat[: n // 2 + 1, 0])
        self.k_max_per_ang = 2.0 * optics.aperture_per_ang
        keep = k_axis <= self.k_max_per_ang
        k_tab = np.append(k_axis[keep], self.k_max_per_ang)
        p_tab = np.append(phat_axis[keep], 0.0)
        self._k_tab = k_tab
        self._khat_tab = p_tab * np.exp(-2.0 * math.pi**2 * self.blur_sigma_ang**2 * k_tab**2)
        spread = abs(optics.defocus_m / ANG) * optics.convergence_rad
        self.cutoff_ang = 6.0 + 2.0 * spread + 3.0 * self.blur_sigma_ang
        self._r_tab = np.linspace(0.0, self.cutoff_ang, int(self.cutoff_ang / 0.01) + 1)
        self._value_tab = self._hankel(self._r_tab)
        self._dr = float(self._r_tab[1] - self._r_tab[0])
        self._value_tab32 = np.append(self._value_tab, [0.0, 0.0]).astype(np.float32)

    def _hankel(self, r_ang: np.ndarray) -> np.ndarray:
        """``K(r) = 2π ∫ K̂(k) J0(2π k r) k dk`` by the trapezoid rule on a fine k table."""
        k = np.linspace(0.0, self.k_max_per_ang, 1024)
        khat = self.khat(k)
        out = np.empty_like(r_ang)
        for start in range(0, r_ang.size, 256):
            r = r_ang[start : start + 256, None]
            integrand = khat[None, :] * scipy.special.j0(2.0 * math.pi * k[None, :] * r) * k
            out[start : start + 256] = 2.0 * math.pi * np.trapezoid(integrand, k, axis=1)
        return np.clip(out, 0.0, None)

    def khat(self, k_per_ang: np.ndarray) -> np.ndarray:
        """``K̂(|k|)``: zero beyond ``2 α / λ``."""
        k = np.asarray(k_per_ang, dtype=np.float64)
        return np.interp(k, self._k_tab, self._khat_tab, right=0.0)

    def value(self, r_ang: np.ndarray) -> np.ndarray:
        """``K(r)`` in 1/Å² (0 beyond ``cutoff_ang``)."""
        r = np.asarray(r_ang, dtype=np.float64)
        return np.interp(r, self._r_tab, self._value_tab, right=0.0)

    def value_fast(self, r_ang: np.ndarray) -> np.ndarray:
        """``K(r)`` as float32 by linear interpolation on the uniform table (no search)."""
        f = np.asarray(r_ang, dtype=np.float32) * np.float32(1.0 / self._dr)
        np.minimum(f, np.float32(self._r_tab.size), out=f)
        i = f.astype(np.int32)
        w = f - i
        tab = self._value_tab32
        return tab[i] * (np.float32(1.0) - w) + tab[i + 1] * w
