"""The scan-planning policy's map of a large sample, its action set and its observation, shared
by :mod:`policies.env_scan` (training) and :mod:`policies.rl` (deployment, which must not import
gymnasium).

The sample is a ``grid x grid`` array of square *tiles* of ``tile_m`` (default 6 x 6 tiles of
64 nm) centred on ``centre_m``. Two magnifications:

- **survey** a tile: one low-magnification frame of the whole tile (:data:`SURVEY_PX` pixels a
  side, 0.5 nm pixels at the default tile, :data:`SURVEY_DWELL_S`). Atoms are not resolved, but
  the beam still lands on single columns: a heavy dopant column is ~2.6x brighter than a Mo
  column, so the pixels above :data:`BRIGHT_FACTOR` x the frame's 99th percentile count dopants
  (:func:`bright_pixels`). The survey records that count and the centroid of the densest block
  (the *hotspot*).
- **zoom** into a tile: one atomic-resolution frame (:data:`ZOOM_PX` pixels over
  :data:`ZOOM_FOV_M`, 0.25 Å pixels, :data:`ZOOM_DWELL_S`) at the unvisited field (on a lattice
  of pitch ``ZOOM_FOV_M``) nearest to the tile's hotspot (its centre before a survey), so
  repeated zooms spiral outwards. :func:`detect_dopants` finds the bright columns in it (the
  cheap detector, whose precision and recall against ground truth the benchmark reports).

Action ``a`` in ``0 .. 2 * grid**2 - 1``: ``a // grid**2`` is the magnification (0 survey,
1 zoom), ``a % grid**2`` the tile (row-major, row = y index). The mask forbids tiles outside the
stage, surveying a tile twice, zooming into a tile not surveyed yet (zooms go where an overview
has been seen) or where :data:`MAX_ZOOMS_PER_TILE` fields have been zoomed, and anything costing
more dose than is left. Dose is counted in units of one zoom frame (a survey costs
:data:`SURVEY_COST` units: twice the pixel-dwell).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from drivers.errors import ConfigError, DataError
from drivers.frame import Frame, ScanRegion

SURVEY, ZOOM = 0, 1
SURVEY_PX = 128
SURVEY_DWELL_S = 1e-6
ZOOM_PX = 64
ZOOM_FOV_M = 1.6e-9
ZOOM_DWELL_S = 2e-6
SURVEY_COST = 2
"""Dose of one survey frame in zoom-frame units (128² px x 1 µs vs 64² px x 2 µs)."""
BRIGHT_FACTOR = 1.8
SURVEY_BLOCKS = 8
TILE_CHANNELS = 6
GLOBAL_FEATURES = 3
MAX_ZOOMS_PER_TILE = 64
ZOOM_PIXEL_LIMIT_M = 1e-10
"""Frames with pixels finer than this are zoom frames, the others survey frames."""


def scan_obs_dim(grid: int) -> int:
    return TILE_CHANNELS * grid * grid + GLOBAL_FEATURES


def scan_n_actions(grid: int) -> int:
    return 2 * grid * grid


def bright_pixels(data: np.ndarray) -> np.ndarray:
    """``(H, W)`` bool: pixels above ``BRIGHT_FACTOR`` x the 99th percentile of the finite ones
    (dopant columns under the beam at survey magnification). Raises :class:`DataError` for a
    frame with no finite pixel."""
    a = np.asarray(data, dtype=np.float64)
    ok = np.isfinite(a)
    if not ok.any():
        raise DataError("survey frame has no finite pixels")
    threshold = BRIGHT_FACTOR * float(np.percentile(a[ok], 99))
    return ok & (np.where(ok, a, -np.inf) > threshold)


def detect_dopants(data: np.ndarray) -> np.ndarray:
    """``(n, 2)`` (row, col) of bright columns in an atomic-resolution frame: local maxima of
    the frame smoothed over one pixel that exceed 1.6 x the 75th percentile of all local maxima
    (the host lattice's columns). Raises :class:`DataError` for a frame with no finite pixel."""
    a = np.asarray(data, dtype=np.float64)
    ok = np.isfinite(a)
    if not ok.any():
        raise DataError("zoom frame has no finite pixels")
    smooth = ndimage.gaussian_filter(np.where(ok, a, float(np.median(a[ok]))), 1.0)
    peaks = (smooth == ndimage.maximum_filter(smooth, size=5)) & ok
    values = smooth[peaks]
    if values.size < 4:
        return np.zeros((0, 2))
    threshold = 1.6 * float(np.percentile(values, 75))
    return np.argwhere(peaks & (smooth > threshold)).astype(np.float64)


@dataclass
class TileState:
    surveyed: bool = False
    bright: int = 0
    hotspot_m: tuple[float, float] | None = None
    zooms: int = 0
    detected: int = 0
    last_detections: int = 0
    visited: set[tuple[int, int]] = field(default_factory=set)


class ScanMap:
    """What has been surveyed and zoomed on a ``grid x grid`` tile map (see the module doc).

    ``stage_x_m`` / ``stage_y_m`` are the stage limits: tiles whose frame centre lies outside
    are masked. ``budget`` is the dose in zoom-frame units (None: unlimited, for deployment).
    """

    def __init__(
        self,
        centre_m: tuple[float, float],
        *,
        grid: int,
        tile_m: float,
        stage_x_m: tuple[float, float],
        stage_y_m: tuple[float, float],
        budget: int | None = None,
    ) -> None:
        if not (isinstance(grid, int) and grid >= 1):
            raise ConfigError(f"grid must be an int >= 1, got {grid!r}")
        if not (math.isfinite(tile_m) and tile_m > ZOOM_FOV_M):
            raise ConfigError(f"tile_m must exceed the zoom field {ZOOM_FOV_M} m, got {tile_m!r}")
        self.centre_m = (float(centre_m[0]), float(centre_m[1]))
        self.grid = grid
        self.tile_m = float(tile_m)
        self.budget = budget
        self.tiles = [TileState() for _ in range(grid * grid)]
        self.spent = 0
        self.frames = 0
        self.detected = 0
        self.current: int | None = None
        half = grid * tile_m / 2
        self.origin_m = (self.centre_m[0] - half, self.centre_m[1] - half)
        self.on_stage = np.array(
            [
                stage_x_m[0] <= x <= stage_x_m[1] and stage_y_m[0] <= y <= stage_y_m[1]
                for x, y in (self.tile_centre_m(t) for t in range(grid * grid))
            ],
            dtype=bool,
        )
        n = int(tile_m // ZOOM_FOV_M)
        self._fields_per_side = n

    # -- geometry --------------------------------------------------------------------------------

    def tile_centre_m(self, tile: int) -> tuple[float, float]:
        row, col = divmod(tile, self.grid)
        return (
            self.origin_m[0] + (col + 0.5) * self.tile_m,
            self.origin_m[1] + (row + 0.5) * self.tile_m,
        )

    def tile_of(self, x_m: float, y_m: float) -> int | None:
        """The tile holding stage point ``(x_m, y_m)``, or None outside the map."""
        col = math.floor((x_m - self.origin_m[0]) / self.tile_m)
        row = math.floor((y_m - self.origin_m[1]) / self.tile_m)
        if 0 <= row < self.grid and 0 <= col < self.grid:
            return row * self.grid + col
        return None

    def _field_centre_m(self, tile: int, key: tuple[int, int]) -> tuple[float, float]:
        row, col = divmod(tile, self.grid)
        x0 = self.origin_m[0] + col * self.tile_m
        y0 = self.origin_m[1] + row * self.tile_m
        return (x0 + (key[1] + 0.5) * ZOOM_FOV_M, y0 + (key[0] + 0.5) * ZOOM_FOV_M)

    def next_zoom_field(self, tile: int) -> tuple[int, int] | None:
        """The unvisited zoom field of ``tile`` nearest to its hotspot (or centre)."""
        state = self.tiles[tile]
        target = state.hotspot_m or self.tile_centre_m(tile)
        row, col = divmod(tile, self.grid)
        n = self._fields_per_side
        fx = (target[0] - (self.origin_m[0] + col * self.tile_m)) / ZOOM_FOV_M - 0.5
        fy = (target[1] - (self.origin_m[1] + row * self.tile_m)) / ZOOM_FOV_M - 0.5
        best: tuple[float, tuple[int, int]] | None = None
        for radius in range(n):
            r0, c0 = round(fy), round(fx)
            for i in range(max(r0 - radius, 0), min(r0 + radius, n - 1) + 1):
                for j in range(max(c0 - radius, 0), min(c0 + radius, n - 1) + 1):
                    if (i, j) in state.visited:
                        continue
                    d = (i - fy) ** 2 + (j - fx) ** 2
                    if best is None or d < best[0]:
                        best = (d, (i, j))
            if best is not None and best[0] <= (radius + 0.5) ** 2:
                return best[1]
        return best[1] if best is not None else None

    # -- actions ---------------------------------------------------------------------------------

    def decode(self, action: int) -> tuple[int, int]:
        """``(magnification, tile)`` of ``action``; :class:`DataError` when out of range."""
        n = self.grid * self.grid
        if isinstance(action, bool) or not isinstance(action, (int, np.integer)):
            raise DataError(f"scan action must be an integer 0..{2 * n - 1}, got {action!r}")
        if not 0 <= int(action) < 2 * n:
            raise DataError(f"scan action must be an integer 0..{2 * n - 1}, got {action!r}")
        return divmod(int(action), n)

    def action_masks(self) -> np.ndarray:
        """``(2 * grid**2,) bool``: the valid actions now (see the module doc)."""
        left = math.inf if self.budget is None else self.budget - self.spent
        survey = np.array([not t.surveyed for t in self.tiles]) & self.on_stage
        zoom = np.array([t.surveyed and t.zooms < MAX_ZOOMS_PER_TILE for t in self.tiles])
        zoom &= self.on_stage
        survey &= left >= SURVEY_COST
        zoom &= left >= 1
        return np.concatenate([survey, zoom])

    def region_for(self, action: int) -> tuple[ScanRegion, tuple[int, int], float]:
        """The frame ``action`` asks for: region, shape and dwell."""
        mag, tile = self.decode(action)
        if mag == SURVEY:
            x, y = self.tile_centre_m(tile)
            return (
                ScanRegion(x, y, self.tile_m, self.tile_m),
                (SURVEY_PX, SURVEY_PX),
                SURVEY_DWELL_S,
            )
        key = self.next_zoom_field(tile)
        if key is None:
            raise DataError(f"tile {tile} has no unvisited zoom field left")
        x, y = self._field_centre_m(tile, key)
        return ScanRegion(x, y, ZOOM_FOV_M, ZOOM_FOV_M), (ZOOM_PX, ZOOM_PX), ZOOM_DWELL_S

    # -- frames ----------------------------------------------------------------------------------

    def ingest(self, frame: Frame) -> tuple[str, int | None, np.ndarray]:
        """Update the map with ``frame``: returns its kind (``survey``: a frame over at least
        half a tile; ``zoom``: pixels of at most :data:`ZOOM_PIXEL_LIMIT_M` over at most two
        zoom fields; ``other``: anything else, or outside the map, which changes nothing), its
        tile and, for a zoom frame, the detected dopant columns ``(n, 2)`` (row, col)."""
        region = frame.scan_region
        tile = self.tile_of(region.center_x_m, region.center_y_m)
        empty = np.zeros((0, 2))
        if tile is None:
            return "other", None, empty
        state = self.tiles[tile]
        pixel = max(frame.pixel_size_m)
        if pixel <= ZOOM_PIXEL_LIMIT_M and region.width_m <= 2 * ZOOM_FOV_M:
            detections = detect_dopants(frame.data)
            row, col = divmod(tile, self.grid)
            key = (
                math.floor((region.center_y_m - self.origin_m[1] - row * self.tile_m) / ZOOM_FOV_M),
                math.floor((region.center_x_m - self.origin_m[0] - col * self.tile_m) / ZOOM_FOV_M),
            )
            state.visited.add(key)
            self.current = tile
            state.zooms += 1
            state.last_detections = int(detections.shape[0])
            state.detected += int(detections.shape[0])
            self.detected += int(detections.shape[0])
            self.spent += 1
            self.frames += 1
            return "zoom", tile, detections
        if region.width_m >= 0.5 * self.tile_m:
            bright = bright_pixels(frame.data)
            state.surveyed = True
            self.current = tile
            state.bright = int(bright.sum())
            state.hotspot_m = _hotspot(bright, region)
            self.spent += SURVEY_COST
            self.frames += 1
            return "survey", tile, empty
        return "other", tile, empty

    def observation(self, *, time_fraction: float = 0.0) -> np.ndarray:
        """``(scan_obs_dim(grid),) float32``: per tile [surveyed, log1p(bright) / 5,
        zooms / 16, log1p(dopants detected) / 4, log1p(detections in its last zoom) / 3, is
        current], then [dose spent / budget, ``time_fraction``, log1p(dopants detected) / 5].
        Only what the instrument shows enters (detections, not ground truth), so the deployed
        policy builds the same observation."""
        t = np.zeros((self.grid * self.grid, TILE_CHANNELS), dtype=np.float32)
        for i, s in enumerate(self.tiles):
            t[i] = (
                float(s.surveyed),
                math.log1p(s.bright) / 5,
                min(s.zooms / 16, 4.0),
                math.log1p(s.detected) / 4,
                math.log1p(s.last_detections) / 3,
                float(self.current == i),
            )
        spent = self.spent / self.budget if self.budget else 0.0
        tail = np.array(
            [min(spent, 1.0), min(max(time_fraction, 0.0), 4.0), math.log1p(self.detected) / 5],
            dtype=np.float32,
        )
        return np.concatenate([t.T.ravel(), tail])


def _hotspot(bright: np.ndarray, region: ScanRegion) -> tuple[float, float] | None:
    """Stage position of the bright pixels' centroid in the densest of SURVEY_BLOCKS² blocks."""
    if not bright.any():
        return None
    h, w = bright.shape
    bh, bw = max(h // SURVEY_BLOCKS, 1), max(w // SURVEY_BLOCKS, 1)
    counts = ndimage.uniform_filter(bright.astype(np.float64), size=(bh, bw), mode="constant")
    r, c = np.unravel_index(int(np.argmax(counts)), counts.shape)
    r0, r1 = max(r - bh // 2, 0), min(r + bh // 2 + 1, h)
    c0, c1 = max(c - bw // 2, 0), min(c + bw // 2 + 1, w)
    rows, cols = np.nonzero(bright[r0:r1, c0:c1])
    row = float(rows.mean()) + r0 if rows.size else float(r)
    col = float(cols.mean()) + c0 if cols.size else float(c)
    x = region.center_x_m + ((col + 0.5) / w - 0.5) * region.width_m
    y = region.center_y_m + ((row + 0.5) / h - 0.5) * region.height_m
    return (x, y)
