"""Procedural chest-CT phantoms in Hounsfield units.

All anatomy is defined in patient millimetres (DICOM LPS: x towards the patient's left,
y posterior, z superior), so structures are continuous in 3D and the voxel grid only
samples them. A phantom has an elliptical body (subcutaneous fat, muscle), ribs and
sternum, a spine with vertebral bodies, discs and posterior elements, two lungs whose
cross-section changes along z (apex, diaphragm domes, cardiac notch), a branching vessel
tree in each lung, heart, aorta, pulmonary trunk, trachea and main bronchi, nodules, the
scanner table, and correlated noise. Everything is computed per patient with numpy
broadcasting; only the vessel segments and nodules are drawn one by one, each inside its
own small bounding box.

Small structures (vessels, nodules) are drawn on a grid supersampled along z and then
averaged, which gives the partial-volume look of thick slices.
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field

import numpy as np

AIR_HU = -1000.0
NODULE_TYPES = ("solid", "part_solid", "ground_glass")


@dataclass(frozen=True)
class Nodule:
    center_xyz_mm: tuple[float, float, float]   # patient coordinates (LPS)
    center_zyx_vox: tuple[float, float, float]  # fractional voxel index in the volume
    radius_mm: float
    kind: str                                   # one of NODULE_TYPES


@dataclass(frozen=True)
class Vessel:
    """One drawn segment of a lung vessel tree: a tapered cylinder from a to b."""

    a_xyz_mm: tuple[float, float, float]        # patient coordinates (LPS)
    b_xyz_mm: tuple[float, float, float]
    r0_mm: float                                # radius at a
    r1_mm: float                                # radius at b


@dataclass
class Phantom:
    hu: np.ndarray                           # (Z, S, S) float32, slice 0 is the most inferior
    origin_xyz_mm: tuple[float, float, float]  # centre of voxel (z=0, row=0, col=0)
    spacing_zyx_mm: tuple[float, float, float]
    nodules: list[Nodule] = field(default_factory=list)
    lung: np.ndarray | None = None           # (Z, S, S) visible lung fraction, for checks
    vessels: list[Vessel] = field(default_factory=list)  # lung vessel segments that touch the volume


@dataclass(frozen=True)
class _Grid:
    xs: np.ndarray  # column centres (mm), ascending
    ys: np.ndarray  # row centres (mm), ascending (anterior to posterior)
    zs: np.ndarray  # slice centres (mm, relative to the lung base), ascending
    edge: float     # in-plane voxel size, the width of soft edges


def _soft(x: np.ndarray) -> np.ndarray:
    """Partial-volume ramp: x is the signed distance to an edge in voxels."""
    return np.clip(x + 0.5, 0.0, 1.0)


def _index_range(coords: np.ndarray, lo: float, hi: float) -> slice:
    """The indices of the ascending `coords` within [lo, hi] (np.searchsorted's left and right
    sides; bisect is the same search without numpy's per-call cost, which tens of thousands of
    vessel segments per phantom pay)."""
    return slice(bisect_left(coords, lo), bisect_right(coords, hi))


def _stretch(arr: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    """Linear interpolation of `arr` along `axis` to n_out samples spanning the same range.

    Gathers instead of matrix products: BLAS threads oversubscribe busy machines."""
    n_in = arr.shape[axis]
    pos = np.linspace(0.0, n_in - 1.0, n_out)
    lo = np.clip(np.floor(pos).astype(int), 0, max(n_in - 2, 0))
    hi = np.minimum(lo + 1, n_in - 1)
    shape = [1] * arr.ndim
    shape[axis] = n_out
    frac = (pos - lo).astype(np.float32).reshape(shape)
    return np.take(arr, lo, axis=axis) * (1.0 - frac) + np.take(arr, hi, axis=axis) * frac


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int, int], cells: int) -> np.ndarray:
    """Zero-mean, roughly unit-variance random field varying over about `cells` cells in-plane."""
    z, h, w = shape
    out = rng.standard_normal((max(2, z // 4), cells, cells)).astype(np.float32)
    for axis, n in ((0, z), (1, h), (2, w)):
        out = _stretch(out, n, axis)
    return out / max(float(out.std()), 1e-6)


def _blur_inplane(vol: np.ndarray, weights: tuple[float, ...]) -> np.ndarray:
    """Separable in-plane filter with edge replication."""
    k = len(weights) // 2
    for axis in (1, 2):
        pad = [(0, 0)] * 3
        pad[axis] = (k, k)
        p = np.pad(vol, pad, mode="edge")
        n = vol.shape[axis]
        acc = np.zeros_like(vol)
        for i, wgt in enumerate(weights):
            acc += wgt * np.take(p, np.arange(i, i + n), axis=axis)
        vol = acc
    return vol


def _capsule(grid: _Grid, a, b, r0: float, r1: float):
    """Coverage of a tapered cylinder from a to b (x, y, z mm) inside its bounding box.

    Returns (box slices, coverage) or None when the box misses the grid."""
    pad = max(r0, r1) + grid.edge
    # z first, in plain floats: most segments of a tree miss a volume of a few slices
    za, zb = float(a[2]), float(b[2])
    sz = _index_range(grid.zs, min(za, zb) - pad, max(za, zb) + pad)
    if sz.start >= sz.stop:
        return None
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    lo, hi = np.minimum(a, b) - pad, np.maximum(a, b) + pad
    sx = _index_range(grid.xs, lo[0], hi[0])
    sy = _index_range(grid.ys, lo[1], hi[1])
    if sx.start >= sx.stop or sy.start >= sy.stop:
        return None
    xx = (grid.xs[sx] - a[0]).astype(np.float32)[None, None, :]
    yy = (grid.ys[sy] - a[1]).astype(np.float32)[None, :, None]
    zz = (grid.zs[sz] - a[2]).astype(np.float32)[:, None, None]
    ab = (b - a).astype(np.float32)
    tt = (xx * ab[0] + yy * ab[1] + zz * ab[2]) / max(float(ab @ ab), 1e-9)
    np.clip(tt, 0.0, 1.0, out=tt)
    d = np.sqrt((xx - tt * ab[0]) ** 2 + (yy - tt * ab[1]) ** 2 + (zz - tt * ab[2]) ** 2)
    cov = _soft((r0 + (r1 - r0) * tt - d) / grid.edge)
    return (sz, sy, sx), cov


class _Layers:
    """Premultiplied paint layers applied on top of the lungs (heart, spine, airways, ...)."""

    def __init__(self) -> None:
        self.items: list[tuple[tuple, np.ndarray, np.ndarray | float]] = []

    def add(self, box, cov: np.ndarray, value) -> None:
        self.items.append((box, cov, value))

    def occlude(self, lung: np.ndarray) -> None:
        for box, cov, _ in self.items:
            lung[box] *= 1.0 - cov

    def paint(self, hu: np.ndarray) -> None:
        for box, cov, value in self.items:
            sub = hu[box]
            sub += (value - sub) * cov


@dataclass
class _Lung:
    """One lung: an elliptical cross-section with wavy outline that narrows to the apex and
    sits on a diaphragm dome. Margins are positive inside."""

    side: int          # -1: patient right (image left), +1: patient left
    cx: float
    cy: float
    ax: float
    ay: float
    height: float      # lung base (z=0) to apex
    dome: float        # diaphragm dome height, fraction of `height`
    shoulder: float    # fraction of height where the apex taper starts
    eps: np.ndarray    # amplitudes of the 2nd..4th outline harmonics
    phase: np.ndarray
    twist: np.ndarray  # change of the harmonic phases from base to apex
    drift: float       # antero-posterior drift of the centre from base to apex (mm)

    def margins(self, x, y, z):
        t = np.asarray(z, np.float32) / self.height
        u = (np.asarray(x, np.float32) - self.cx) / self.ax
        v = (np.asarray(y, np.float32) - (self.cy + self.drift * (t - 0.5))) / self.ay
        rho = np.sqrt(u * u + v * v)
        c = u / np.maximum(rho, 1e-6)
        s = v / np.maximum(rho, 1e-6)
        c2, s2 = 2 * c * c - 1, 2 * c * s
        c3, s3 = c * (4 * c * c - 3), s * (3 - 4 * s * s)
        c4, s4 = 2 * c2 * c2 - 1, 2 * s2 * c2
        outline = 1.0
        for k, (ck, sk) in enumerate(((c2, s2), (c3, s3), (c4, s4))):
            ph = self.phase[k] + self.twist[k] * t
            outline = outline + self.eps[k] * (ck * np.cos(ph) - sk * np.sin(ph))
        taper = np.clip((t - self.shoulder) / (1.03 - self.shoulder), 0.0, 1.0)
        scale = np.sqrt(np.clip(1.0 - taper * taper, 0.0, 1.0))
        radial = scale * outline - rho
        dome_mm = (t - self.dome * (1.0 - np.minimum(rho * rho, 1.0))) * self.height
        return radial, dome_mm

    def contains(self, p: np.ndarray) -> np.ndarray:
        """Which of the points p (n, 3) lie safely inside the lung."""
        radial, dome_mm = self.margins(p[:, 0], p[:, 1], p[:, 2])
        return (radial > 0.03) & (dome_mm > 2.0)


def _unit_rows(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-9)


def _vessel_tree(rng, lung: _Lung, hilum: np.ndarray, r0: float, budget: int) -> list[tuple]:
    """Segments (a, b, r_a, r_b) of a bifurcating tree that stays inside the lung.

    Grown one generation at a time so each generation is a handful of array operations."""
    up, lateral, post = np.eye(3)[2], np.eye(3)[0] * lung.side, np.eye(3)[1]
    trunks = np.stack([up + lateral * 0.4, lateral + up * 0.2, lateral - up * 0.5 + post * 0.3,
                       -up + lateral * 0.3 + post * 0.4, -up * 0.6 - post * 0.5 + lateral * 0.3])
    d = _unit_rows(trunks + rng.normal(0.0, 0.25, trunks.shape))
    start = np.repeat(hilum[None], len(d), axis=0)
    r = r0 * rng.uniform(0.75, 1.0, len(d))
    segments: list[tuple] = []
    for _depth in range(11):
        n = len(r)
        if n == 0 or len(segments) >= budget:
            break
        length = r * rng.uniform(4.0, 7.0, n) + 2.0
        end = start + d * length[:, None]
        ok = lung.contains(end)
        for _attempt in range(3):
            if ok.all():
                break
            retry = ~ok
            half = start[retry] + d[retry] * (0.5 * length[retry, None])
            inside = lung.contains(half)
            idx = np.flatnonzero(retry)
            end[idx[inside]] = half[inside]
            ok[idx[inside]] = True
            turn = idx[~inside]
            d[turn] = _unit_rows(d[turn] + rng.normal(0.0, 0.6, (len(turn), 3)))
            end[turn] = start[turn] + d[turn] * length[turn, None]
            ok[turn] = lung.contains(end[turn])
        keep = np.flatnonzero(ok)
        if len(keep) > budget - len(segments):
            keep = np.sort(rng.choice(keep, budget - len(segments), replace=False))
        start, end, d, r = start[keep], end[keep], d[keep], r[keep]
        r_end = r * 0.95
        segments.extend(zip(start, end, r, r_end))
        grow = r_end >= 0.55
        start, end, d, r_end = start[grow], end[grow], d[grow], r_end[grow]
        n = len(r_end)
        outward = _unit_rows(end - hilum)
        axis = _unit_rows(np.cross(d, rng.normal(size=(n, 3))))
        children_d, children_r = [], []
        for ratio, angle, sign in (((0.8, 0.9), (0.25, 0.6), 1.0), ((0.65, 0.85), (0.45, 0.95), -1.0)):
            a = sign * rng.uniform(*angle, n)[:, None]
            rotated = d * np.cos(a) + np.cross(axis, d) * np.sin(a)
            children_d.append(_unit_rows(rotated + 0.3 * outward))
            children_r.append(r_end * rng.uniform(*ratio, n))
        start = np.concatenate([end, end])
        d = np.concatenate(children_d)
        r = np.concatenate(children_r)
    return segments


def _ellipsoid(grid: _Grid, center, axes, angle: float, grow: float = 0.0):
    """Coverage of an ellipsoid rotated in-plane by `angle` (rad), axes grown by `grow` mm."""
    a, b, c = (x + grow for x in axes)
    reach = max(a, b) + grid.edge
    sx = _index_range(grid.xs, center[0] - reach, center[0] + reach)
    sy = _index_range(grid.ys, center[1] - reach, center[1] + reach)
    sz = _index_range(grid.zs, center[2] - c, center[2] + c)
    if sx.start >= sx.stop or sy.start >= sy.stop or sz.start >= sz.stop:
        return None
    xx = (grid.xs[sx] - center[0]).astype(np.float32)[None, None, :]
    yy = (grid.ys[sy] - center[1]).astype(np.float32)[None, :, None]
    zz = (grid.zs[sz] - center[2]).astype(np.float32)[:, None, None]
    ca, sa = np.cos(angle), np.sin(angle)
    q = np.sqrt(((ca * xx + sa * yy) / a) ** 2 + ((-sa * xx + ca * yy) / b) ** 2 + (zz / c) ** 2)
    return (sz, sy, sx), _soft((1.0 - q) * min(a, b) / grid.edge)


def _draw_nodule(fine: np.ndarray, grid: _Grid, nod_xyz, radius: float, kind: str,
                 rel: dict[str, float], rng) -> None:
    axes = radius * rng.uniform(0.85, 1.15, 3)
    lobes, lobe_phase = rng.uniform(0.0, 0.12), rng.uniform(0, 2 * np.pi)
    reach = axes.max() * (1.0 + lobes) + grid.edge
    sx = _index_range(grid.xs, nod_xyz[0] - reach, nod_xyz[0] + reach)
    sy = _index_range(grid.ys, nod_xyz[1] - reach, nod_xyz[1] + reach)
    sz = _index_range(grid.zs, nod_xyz[2] - reach, nod_xyz[2] + reach)
    if sx.start >= sx.stop or sy.start >= sy.stop or sz.start >= sz.stop:
        return
    xx = (grid.xs[sx] - nod_xyz[0]).astype(np.float32)[None, None, :] / axes[0]
    yy = (grid.ys[sy] - nod_xyz[1]).astype(np.float32)[None, :, None] / axes[1]
    zz = (grid.zs[sz] - nod_xyz[2]).astype(np.float32)[:, None, None] / axes[2]
    rho_xy = np.sqrt(xx * xx + yy * yy)
    c = xx / np.maximum(rho_xy, 1e-6)
    s = yy / np.maximum(rho_xy, 1e-6)
    cos3 = c * (4 * c * c - 3) * np.cos(lobe_phase) - s * (3 - 4 * s * s) * np.sin(lobe_phase)
    q = np.sqrt(xx * xx + yy * yy + zz * zz) / (1.0 + lobes * cos3)
    sub = fine[sz, sy, sx]
    if kind == "ground_glass":
        np.maximum(sub, _soft((1.0 - q) * radius / grid.edge) * rel["ground_glass"], out=sub)
    elif kind == "part_solid":
        core = rng.uniform(0.3, 0.6)
        np.maximum(sub, _soft((1.0 - q) * radius / grid.edge) * rel["ground_glass"], out=sub)
        np.maximum(sub, _soft((core - q) * radius / grid.edge) * rel["solid"], out=sub)
    else:
        np.maximum(sub, _soft((1.0 - q) * radius / grid.edge) * rel["solid"], out=sub)


def _place_nodules(rng, lung_vis: np.ndarray, grid: _Grid, dz: float) -> list[tuple]:
    """(centre xyz, radius, kind) for nodules placed where the lung is visible."""
    count = int(rng.choice(7, p=[0.12, 0.24, 0.24, 0.16, 0.11, 0.07, 0.06]))
    candidates = np.flatnonzero(lung_vis.ravel() > 0.98)
    if count == 0 or candidates.size == 0:
        return []
    z_n, h, w = lung_vis.shape
    placed: list[tuple] = []
    for _ in range(count):
        radius = float(np.exp(rng.uniform(np.log(3.0), np.log(25.0)))) / 2.0
        kind = NODULE_TYPES[int(rng.choice(3, p=[0.55, 0.25, 0.2]))]
        if kind == "part_solid" and radius < 3.0:
            kind = "solid"
        for _attempt in range(40):
            k, i, j = np.unravel_index(int(candidates[rng.integers(candidates.size)]), lung_vis.shape)
            center = np.array([grid.xs[j] + rng.uniform(-0.5, 0.5) * grid.edge,
                               grid.ys[i] + rng.uniform(-0.5, 0.5) * grid.edge,
                               grid.zs[k] + rng.uniform(-0.5, 0.5) * dz])
            off = int(round(0.6 * radius / grid.edge))
            probes = [(i, min(j + off, w - 1)), (i, max(j - off, 0)),
                      (min(i + off, h - 1), j), (max(i - off, 0), j)]
            if min(lung_vis[k, pi, pj] for pi, pj in probes) < 0.5:
                continue
            if any(np.linalg.norm(center - c) < radius + r + 4.0 for c, r, _ in placed):
                continue
            placed.append((center, radius, kind))
            break
    return placed


def slice_spacing(coverage: float, slices: int, slice_thickness: float | None) -> float:
    """The slice spacing in mm: `slice_thickness` when given, else the slices spread over the
    anatomy's `coverage`, rounded to 0.125 mm and kept within the 0.625-5 mm of clinical CT."""
    if slice_thickness is not None:
        return float(slice_thickness)
    return float(np.clip(round(coverage / slices / 0.125) * 0.125, 0.625, 5.0))


def make_phantom(rng: np.random.Generator, slices: int, size: int, noise: bool = True,
                 slice_thickness: float | None = None) -> Phantom:
    """One patient's chest CT volume (float32 HU) with its nodules; `slice_thickness` (mm)
    fixes the slice spacing, else the slices spread over the chest (0.625-5 mm)."""
    # --- patient-level anatomy -------------------------------------------------------
    bx = rng.uniform(138.0, 182.0)
    by = bx * rng.uniform(0.62, 0.78)
    fat, muscle, rib_w = rng.uniform(6.0, 28.0), rng.uniform(8.0, 18.0), rng.uniform(8.0, 11.0)
    p_front, p_back = rng.uniform(2.0, 2.4), rng.uniform(2.7, 3.5)
    xc, yc = rng.uniform(-10.0, 10.0), rng.uniform(-15.0, 5.0)
    height = rng.uniform(205.0, 270.0)
    fov = float(np.clip(2.0 * bx * rng.uniform(1.12, 1.3), 320.0, 500.0))
    dx = fov / size

    coverage = height + rng.uniform(30.0, 50.0)
    dz = slice_spacing(coverage, slices, slice_thickness)
    span = slices * dz
    if span >= coverage:
        z0 = -25.0 - (span - coverage) / 2.0
    else:
        z0 = rng.uniform(-25.0, -25.0 + coverage - span)
    zs = (z0 + dz * np.arange(slices)).astype(np.float64)
    xs = (np.arange(size) - (size - 1) / 2.0) * dx
    ys = xs.copy()
    grid = _Grid(xs, ys, zs, dx)
    t = (zs / height).astype(np.float32)[:, None, None]
    X = xs.astype(np.float32)[None, None, :]
    Y = ys.astype(np.float32)[None, :, None]

    # --- body wall: fat, muscle, rib ring, cavity --------------------------------------
    grow = 1.0 + 0.05 * np.clip(t - 0.5, -0.6, 0.6)
    u = np.abs((X - xc) / (bx * grow))
    v = (Y - yc) / (by * grow)
    back = v > 0
    p = np.where(back, p_back, p_front).astype(np.float32)
    rb = (np.where(back, u ** p_back, u ** p_front) + np.abs(v) ** p) ** (1.0 / p)
    scale = by / dx
    r_fat = 1.0 - fat / by
    r_mus = r_fat - muscle / by
    r_cav = r_mus - rib_w / by
    hu = np.full(rb.shape, AIR_HU, np.float32)
    hu += (-100.0 - AIR_HU) * _soft((1.0 - rb) * scale)
    hu += (45.0 + 100.0) * _soft((r_fat - rb) * scale)
    cav = _soft((r_cav - rb) * scale)
    hu += (38.0 - 45.0) * cav

    # ribs run around the cage, descending anteriorly; the angle is 0 at the spine
    phi = np.arctan2(np.abs(X[0] - xc), Y[0] - yc)[None]
    rib_pitch, rib_h = rng.uniform(24.0, 30.0), rng.uniform(9.0, 12.0)
    slope, phi_max = rng.uniform(22.0, 38.0), rng.uniform(2.0, 2.35)
    w = np.mod(zs[:, None, None] - rng.uniform(0, rib_pitch) + slope * phi, rib_pitch) / rib_h
    radial = (rb - (r_cav + r_mus) / 2.0) / ((r_mus - r_cav) / 2.0)
    d = np.sqrt((2.0 * w - 1.0) ** 2 + radial ** 2)
    in_cage = ((t > -0.15) & (t < 1.05)).astype(np.float32)
    rib = np.clip((1.0 - d) * 3.0, 0.0, 1.0) * (w < 1.0) * in_cage
    cortex = np.clip((d - 0.5) * 4.0, 0.0, 1.0)
    bone_val = 230.0 + 700.0 * cortex
    hu += (np.where(phi < phi_max, bone_val, 120.0) - hu) * rib * (phi < phi_max + 0.4)
    sternum = ((np.abs(X - xc) < 13.0) & (phi > 2.75) & (t > 0.2) & (t < 0.88)).astype(np.float32)
    sternum *= np.clip((1.0 - np.abs(radial)) * 3.0, 0.0, 1.0)
    hu += (250.0 + 500.0 * cortex - hu) * sternum
    del w, d, radial, rib, cortex, bone_val, sternum, u, v, p, back

    cav_x, cav_y = bx * r_cav, by * r_cav
    medfat = _ellipsoid(grid, (xc, yc - cav_y * 0.3, height * 0.55), (30.0, 28.0, 90.0), 0.0)
    if medfat:
        box, cov = medfat
        hu[box] += (-90.0 - hu[box]) * cov

    # --- lungs -------------------------------------------------------------------------
    dome = rng.uniform(0.08, 0.15)
    lungs = []
    for side in (-1, 1):
        lungs.append(_Lung(
            side=side,
            cx=xc + side * cav_x * rng.uniform(0.54, 0.58),
            cy=yc + cav_y * rng.uniform(0.03, 0.1),
            ax=cav_x * rng.uniform(0.42, 0.47),
            ay=cav_y * rng.uniform(0.88, 0.98),
            height=height,
            dome=dome + (0.04 if side < 0 else 0.0),
            shoulder=rng.uniform(0.4, 0.52),
            eps=rng.uniform(0.015, 0.06, 3),
            phase=rng.uniform(0, 2 * np.pi, 3),
            twist=rng.uniform(-2.0, 2.0, 3),
            drift=rng.uniform(-15.0, 15.0),
        ))
    lung_frac = np.zeros_like(hu)
    dz_edge = max(dz, dx)
    for lung in lungs:
        sx = _index_range(xs, lung.cx - lung.ax * 1.3, lung.cx + lung.ax * 1.3)
        radial, dome_mm = lung.margins(X[..., sx], Y, zs.astype(np.float32)[:, None, None])
        frac = _soft(radial * lung.ax / dx) * _soft(dome_mm / dz_edge) * cav[..., sx]
        np.maximum(lung_frac[..., sx], frac, out=lung_frac[..., sx])
    del cav, radial, dome_mm, frac

    # --- structures painted over the lungs ------------------------------------------------
    layers = _Layers()
    rv = rng.uniform(14.0, 19.0)
    yv = yc + cav_y * rng.uniform(0.6, 0.7)
    _add_spine(layers, grid, rng, xc, yv, rv, yc + by - fat - 4.0)

    heart_c = (xc + cav_x * rng.uniform(0.08, 0.2), yc - cav_y * rng.uniform(0.15, 0.3),
               height * rng.uniform(0.12, 0.24))
    heart_ax = (cav_x * rng.uniform(0.42, 0.52), cav_y * rng.uniform(0.45, 0.6),
                height * rng.uniform(0.2, 0.26))
    heart_angle = np.deg2rad(rng.uniform(15.0, 40.0))
    for grow_mm, value in ((rng.uniform(2.0, 6.0), -90.0), (0.0, 40.0)):
        e = _ellipsoid(grid, heart_c, heart_ax, heart_angle, grow_mm)
        if e:
            layers.add(e[0], e[1], value)

    hx, hy, hz = heart_c
    top = hz + heart_ax[2] * 0.55
    z_arch = height * rng.uniform(0.68, 0.76)
    ra = rng.uniform(12.0, 16.0)
    desc = (xc + 25.0, yv - rv - ra * 0.6, z_arch)
    aorta = [(hx - 5.0, hy, top), (hx - 5.0, hy, z_arch), (xc + 10.0, yc, z_arch + 10.0), desc,
             (desc[0], desc[1], -120.0)]
    hila = [np.array([lg.cx - lg.side * lg.ax * 0.6, lg.cy - 0.1 * lg.ay, height * rng.uniform(0.45, 0.55)])
            for lg in lungs]
    pa_split = (xc + 5.0, yc - cav_y * 0.05, height * 0.52)
    tubes = [(aorta[i], aorta[i + 1], ra, ra * (0.85 if i >= 2 else 1.0)) for i in range(4)]
    tubes += [((hx + 10.0, hy - 0.3 * heart_ax[1], top), pa_split, 13.0, 12.0)]
    tubes += [(pa_split, tuple(h), 10.0, 7.0) for h in hila]
    for a, b, r0, r1 in tubes:
        cap = _capsule(grid, a, b, r0, r1)
        if cap:
            layers.add(cap[0], cap[1], 40.0)

    y_tr = yv - rv - rng.uniform(16.0, 24.0)
    carina = (xc + rng.uniform(-5, 5), y_tr, height * rng.uniform(0.58, 0.64))
    r_tr = rng.uniform(7.0, 10.0)
    airways = [((xc, y_tr, height * 1.3), carina, r_tr, r_tr)]
    airways += [(carina, tuple(h + np.array([0.0, 8.0, 12.0])), r_tr * 0.75, r_tr * 0.55) for h in hila]
    for wall, value in ((2.0, 30.0), (0.0, AIR_HU)):
        for a, b, r0, r1 in airways:
            cap = _capsule(grid, a, b, r0 + wall, r1 + wall)
            if cap:
                layers.add(cap[0], cap[1], value)

    lung_vis = lung_frac.copy()
    layers.occlude(lung_vis)

    # --- vessels and nodules on a z-supersampled grid ------------------------------------
    lung_base = rng.uniform(-880.0, -820.0)
    rel = {"vessel": rng.uniform(30.0, 50.0) - lung_base,
           "solid": rng.uniform(30.0, 60.0) - lung_base,
           "ground_glass": rng.uniform(-600.0, -450.0) - lung_base}
    n_sub = int(np.clip(round(dz / dx), 1, 4))
    n_sub = max(1, min(n_sub, int(64e6 // (slices * size * size))))
    zf = z0 - dz / 2.0 + (np.arange(slices * n_sub) + 0.5) * dz / n_sub
    fine_grid = _Grid(xs, ys, zf, dx)
    fine = np.zeros((slices * n_sub, size, size), np.float32)
    roots = [(lung, hilum + offset) for lung, hilum in zip(lungs, hila)
             for offset in ((0.0, 0.0, 0.0), (0.0, -12.0, -15.0), (0.0, 5.0, 35.0))]
    vessels = []
    for lung, root in roots:
        for a, b, r0, r1 in _vessel_tree(rng, lung, root, rng.uniform(3.0, 4.5), budget=650):
            cap = _capsule(fine_grid, a, b, r0, r1)
            if cap:
                sub = fine[cap[0]]
                np.maximum(sub, cap[1] * rel["vessel"], out=sub)
                # recorded for labels only: no random draws, so the pixels stay as they are
                vessels.append(Vessel(tuple(map(float, a)), tuple(map(float, b)), float(r0), float(r1)))
    placed = _place_nodules(rng, lung_vis, grid, dz)
    for center, radius, kind in placed:
        _draw_nodule(fine, fine_grid, center, radius, kind, rel, rng)
    excess = fine.reshape(slices, n_sub, size, size).mean(axis=1)
    del fine

    # --- compose ---------------------------------------------------------------------------
    mottle = _smooth_field(rng, hu.shape, cells=16)
    gradient = rng.uniform(15.0, 45.0) * np.clip((Y - yc) / by, -1.0, 1.0)
    lung_hu = lung_base + gradient + rng.uniform(8.0, 25.0) * mottle
    if rng.random() < 0.3:
        emphysema = np.clip((mottle - rng.uniform(1.0, 1.8)) * 2.0, 0.0, 0.85)
        lung_hu += (-965.0 - lung_hu) * emphysema
    lung_hu += excess
    hu += (lung_hu - hu) * lung_frac
    del lung_hu, excess, mottle
    layers.paint(hu)
    _paint_table(hu, grid, rng, xc, yc + by * float(grow.max()))

    hu = _blur_inplane(hu, (0.25, 0.5, 0.25))
    if noise:
        white = rng.standard_normal(hu.shape, dtype=np.float32)
        hu += rng.uniform(7.0, 16.0) * white
        rng.standard_normal(hu.shape, dtype=np.float32, out=white)
        corr = _blur_inplane(white, (0.0625, 0.25, 0.375, 0.25, 0.0625))
        hu += rng.uniform(8.0, 20.0) / 0.2735 * corr
        del white, corr

    nodules = [Nodule(center_xyz_mm=(float(c[0]), float(c[1]), float(c[2])),
                      center_zyx_vox=(float((c[2] - zs[0]) / dz), float((c[1] - ys[0]) / dx),
                                      float((c[0] - xs[0]) / dx)),
                      radius_mm=float(r), kind=kind) for c, r, kind in placed]
    return Phantom(hu=hu, origin_xyz_mm=(float(xs[0]), float(ys[0]), float(zs[0])),
                   spacing_zyx_mm=(dz, dx, dx), nodules=nodules, lung=lung_vis, vessels=vessels)


def _add_spine(layers: _Layers, grid: _Grid, rng, xc: float, yv: float, rv: float, y_max: float) -> None:
    """Vertebral bodies (cortical shell, cancellous core), discs, and posterior elements,
    as three in-plane templates chosen per slice by the vertebral level."""
    X = grid.xs.astype(np.float32)[None, :]
    Y = grid.ys.astype(np.float32)[:, None]
    e = grid.edge
    q = np.sqrt(((X - xc) / (rv * 1.12)) ** 2 + ((Y - yv) / rv) ** 2)
    body = _soft((1.0 - q) * rv / e)
    cortical = _soft((q - (1.0 - 2.0 / rv)) * rv / e)
    body_val = rng.uniform(150.0, 300.0) + (rng.uniform(700.0, 1100.0) - 250.0) * cortical

    yc_canal = yv + rv + 8.0
    rc = rng.uniform(6.0, 8.0)
    canal_d = np.sqrt((X - xc) ** 2 + (Y - yc_canal) ** 2)
    lamina = _soft((rc + 5.0 - canal_d) / e)
    spinous = (_soft((4.0 - np.abs(X - xc)) / e) * _soft((Y - yc_canal) / e)
               * _soft((min(yc_canal + 32.0, y_max) - Y) / e))
    transverse = (_soft((4.0 - np.abs(Y - yc_canal + 2.0)) / e) * _soft((36.0 - np.abs(X - xc)) / e))
    posterior = np.maximum(np.maximum(lamina, spinous), transverse)
    canal = _soft((rc - canal_d) / e)

    # premultiplied templates: 0 disc, 1 body, 2 body + posterior elements
    alpha = np.zeros((3,) + q.shape, np.float32)
    premul = np.zeros_like(alpha)
    alpha[0], premul[0] = body, body * 90.0
    alpha[1], premul[1] = body, body * body_val
    a, pm = body.copy(), body * body_val
    pm = pm * (1 - posterior) + posterior * 650.0
    a = a * (1 - posterior) + posterior
    pm = pm * (1 - canal) + canal * 20.0
    a = a * (1 - canal) + canal
    alpha[2], premul[2] = a, pm

    pitch = rng.uniform(24.0, 30.0)
    phase = np.mod(grid.zs - rng.uniform(0, pitch), pitch) / pitch
    level = np.where(phase < 0.17, 0, np.where(phase < 0.75, 2, 1))
    cov = alpha[level]
    value = premul[level] / np.maximum(cov, 1e-6)
    layers.add((slice(None),) * 3, cov, value)


def _paint_table(hu: np.ndarray, grid: _Grid, rng, xc: float, body_bottom: float) -> None:
    """Curved carbon-fibre couch with a foam core just below the body."""
    X = grid.xs.astype(np.float32)[None, :]
    Y = grid.ys.astype(np.float32)[:, None]
    e = grid.edge
    top = body_bottom + rng.uniform(0.5, 3.0) + rng.uniform(0.0, 6e-4) * (X - xc) ** 2
    thick, half = rng.uniform(8.0, 14.0), rng.uniform(190.0, 235.0)
    depth = Y - top
    cov = _soft(depth / e) * _soft((thick - depth) / e) * _soft((half - np.abs(X - xc)) / e)
    shell = (depth < 1.5) | (depth > thick - 1.5)
    value = np.where(shell, 200.0, -900.0).astype(np.float32)
    hu += (value - hu) * cov[None]
