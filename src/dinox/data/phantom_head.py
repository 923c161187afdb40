"""Procedural axial head-CT phantoms in Hounsfield units (the `head` family of `dinox synth`).

Like the chest phantom (dinox.data.phantom), all anatomy is defined in patient millimetres
(DICOM LPS: x towards the patient's left, y posterior, z superior), so structures continue
smoothly along z and the voxel grid only samples them. The head is built in its own frame
(u lateral, v posterior, w superior; w = 0 near the orbitomeatal plane), tilted and shifted
per patient, then sampled on the scanner grid:

- scalp: skin over a thin fat layer, thicker over the temporalis muscles;
- skull: inner and outer cortical tables with diploe between them, thickness varying
  over the vault; the skull base as a bony block under the floor of the three cranial
  fossae (anterior fossa over the orbits, middle fossae laterally, posterior fossa
  lowest), whose step between the middle and posterior fossae is the petrous ridge;
- brain: cortex folded along the zero set of a narrow-band random field (a labyrinth
  like gyri and sulci), white matter below it, subarachnoid CSF, deep grey nuclei,
  lateral ventricles drawn as tubes along their C-shaped course (frontal horns diverge
  like a butterfly, the atria and temporal horns appear on lower slices), third and
  fourth ventricles, interhemispheric fissure with the falx, Sylvian fissures and insula,
  tentorium, cerebellum with finer folia, brainstem with the cisterns around it;
- skull base and face: orbits (bony cone, orbital fat, globe, lens, optic nerve, medial
  and lateral recti), ethmoid, sphenoid, frontal and maxillary sinuses, nasal cavity,
  nasopharynx and mastoid air cells (air with bony septa), external auditory canals;
- findings (labels.json like chest nodules): acute haemorrhages, intraparenchymal
  (lobulated blobs, optionally with an oedema rim) or subdural (crescents along the inner
  table);
- acquisition: head holder, beam hardening of the bone (cupping under the skull and dark
  bands between dense bones, from a filtered back-projection of a distorted sinogram, see
  `projection_artefacts`) and correlated noise.

Typical attenuation values, in HU at 120 kVp, from standard radiology references (the
Hounsfield-unit tables of e.g. Radiopaedia's "Hounsfield unit" article and of Broder &
Preston, "Imaging the head: a comprehensive review", Emerg. Med. Clin. N. Am. 2007;
haemorrhage: Parizel et al., "Intracranial hemorrhage: principles of CT and MRI
interpretation", Eur. Radiol. 11, 2001): air -1000; fat -100 (-120..-80); CSF 0..+15; white
matter +20..+30; grey matter +35..+45; acute haematoma +60..+80 (clotted blood); vitreous
of the globe about +10; lens about +80..+120; muscle +40..+60; diploe (cancellous bone)
+400..+700; cortical bone of the skull tables +1000..+1800 (petrous bone up to about
+2000).

This module also holds what the head and limb families share (`Finding`, `FamilyPhantom`,
`projection_artefacts`, `add_noise`, `WaveField`): dinox.data.phantom_limb imports them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np

from dinox.data.phantom import (AIR_HU, Nodule, Phantom, _blur_inplane, _capsule, _ellipsoid, _Grid, _index_range,
                                _smooth_field, _soft, _unit_rows, slice_spacing)

HAEMORRHAGE_TYPES = ("intraparenchymal", "subdural")
SATURATION_MM = 60.0       # water-equivalent path beyond which beam hardening grows linearly


# --- shared with the limb family ------------------------------------------------------------

@dataclass(frozen=True)
class Finding(Nodule):
    """A labelled lesion of the head or limb family, recorded in labels.json like a chest
    nodule (`kind` is its type), with the HU it was drawn with at its centre."""

    hu: float = 0.0                     # nominal HU at the centre (before blur and noise)
    extent_mm: float | None = None      # half-length of an elongated finding (subdural)


@dataclass
class FamilyPhantom(Phantom):
    """A Phantom of the head or limb family: `nodules` holds its Findings."""

    family: str = "chest"
    body_part: str = "CHEST"            # DICOM BodyPartExamined (a CS defined term)
    anatomy: dict = field(default_factory=dict)   # per-patient facts for labels.json


class WaveField:
    """A unit-variance random field: the sum of `n` plane waves of about one wavelength in
    random 3-D directions. A narrow-band isotropic field like this has a zero set that forms
    a labyrinth (the look of gyri and sulci), and, unlike a grid-based field, it is defined
    at every point in millimetres, so it is the same whatever the voxel grid.

    Directions are drawn in the head (or limb) frame; `rot` maps scanner offsets to that
    frame (frame = rot @ (p - centre))."""

    def __init__(self, rng: np.random.Generator, n: int, wavelength: float, spread: float = 0.15):
        self.k = (2.0 * np.pi / (wavelength * rng.uniform(1.0 - spread, 1.0 + spread, n)))[:, None] \
            * _unit_rows(rng.standard_normal((n, 3)))
        self.phase = rng.uniform(0.0, 2.0 * np.pi, n)
        self.norm = np.sqrt(2.0 / n)

    def at(self, pts: np.ndarray) -> np.ndarray:
        """Values at points (..., 3) given in the field's own frame."""
        return self.norm * np.cos(pts @ self.k.T + self.phase).sum(axis=-1)

    def on_grid(self, xs, ys, zs, rot: np.ndarray, centre) -> np.ndarray:
        """Values on the scanner grid (Z, H, W). The phase k.(rot (p - c)) is linear in the
        scanner coordinates, so every wave is an outer product of three 1-D phasors:
        four passes over the volume per wave instead of a cosine per voxel."""
        ks = self.k @ rot                           # wave vectors in scanner coordinates
        phi = self.phase - ks @ np.asarray(centre, np.float64)
        out = np.zeros((len(zs), len(ys), len(xs)), np.float32)
        tmp = np.empty_like(out)
        for (kx, ky, kz), p in zip(ks, phi):
            e = np.exp(1j * (ky * ys))[:, None] * np.exp(1j * (kx * xs))[None, :]
            ez = np.exp(1j * (kz * zs + p))
            er, ei = e.real.astype(np.float32), e.imag.astype(np.float32)
            np.multiply(ez.real.astype(np.float32)[:, None, None], er, out=tmp)
            out += tmp
            np.multiply(ez.imag.astype(np.float32)[:, None, None], ei, out=tmp)
            out -= tmp
        out *= self.norm
        return out


def add_noise(hu: np.ndarray, rng: np.random.Generator, white_sd: float, corr_sd: float) -> None:
    """White plus in-plane correlated noise, in place (the chest phantom's noise model: the
    binomial kernel's output has a standard deviation of 0.2735 per unit of white noise)."""
    white = rng.standard_normal(hu.shape, dtype=np.float32)
    hu += white_sd * white
    rng.standard_normal(hu.shape, dtype=np.float32, out=white)
    hu += corr_sd / 0.2735 * _blur_inplane(white, (0.0625, 0.25, 0.375, 0.25, 0.0625))


def _resample_axis(arr: np.ndarray, pos: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation of `arr` along `axis` at fractional indices `pos` (clamped)."""
    n = arr.shape[axis]
    pos = np.clip(pos, 0.0, n - 1.0)
    lo = np.minimum(np.floor(pos).astype(int), max(n - 2, 0))
    hi = np.minimum(lo + 1, n - 1)
    shape = [1] * arr.ndim
    shape[axis] = len(pos)
    frac = (pos - lo).astype(np.float32).reshape(shape)
    return np.take(arr, lo, axis=axis) * (1.0 - frac) + np.take(arr, hi, axis=axis) * frac


def projection_artefacts(excess: np.ndarray, dx: float, rng: np.random.Generator, *, beta: float,
                         starvation: float = 0.0, n_angles: int = 48, max_size: int = 96) -> np.ndarray:
    """HU error that beam hardening and photon starvation leave in a filtered back-projection.

    `excess` (Z, H, W) is the attenuation above that of soft tissue relative to water's
    (about HU / 1000 for bone; several times that for metal, which the image clips). Its
    line integrals p (mm of water equivalent) are computed at `n_angles` angles over 180
    degrees; a polychromatic beam hardens along long paths, so the scanner measures about
    p - beta p^2 (its water correction does not know the bone or metal), the deficit growing
    only linearly beyond SATURATION_MM once the beam is hard; photon starvation adds noise
    whose deviation grows like exp(p / 2) in the water attenuation length (about 1 / 0.019 mm
    at 70 keV), up to p = 150 mm (beyond that the detector's electronic noise floor, not
    the photon count, sets it). The error sinogram, ramp-filtered and back-projected, gives the
    familiar artefacts: a darker band under thick bone (cupping), dark streaks along the
    lines joining dense objects (between petrous bones; between metal parts) with bright
    streaks beside them, and fine radiating streak noise around metal.

    For speed the projection and back-projection run on a grid of at most `max_size`
    pixels a side (block means of the input) and the error is interpolated back."""
    z, h, w = excess.shape
    f = max(1, int(np.ceil(max(h, w) / max_size)))
    hc, wc = -(-h // f), -(-w // f)
    pad = np.zeros((z, hc * f, wc * f), np.float32)
    pad[:, :h, :w] = excess
    small = pad.reshape(z, hc, f, wc, f).mean(axis=(2, 4))
    ds = dx * f
    yc = (np.arange(hc) - (hc - 1) / 2.0) * ds
    xc = (np.arange(wc) - (wc - 1) / 2.0) * ds
    n_bins = int(np.ceil(np.hypot(hc, wc))) + 4
    thetas = np.pi * (np.arange(n_angles) + rng.uniform()) / n_angles
    flat = small.reshape(z, -1)
    # only pixels with excess attenuation project (bone and metal: a few per cent of them)
    nz_z, nz_p = np.nonzero(flat)
    weights = flat[nz_z, nz_p].astype(np.float64)
    row = nz_z * n_bins
    freq = np.abs(np.fft.rfftfreq(2 * n_bins, d=ds))
    recon = np.zeros((z, hc * wc), np.float32)
    px, py = np.meshgrid(xc, yc)
    px, py = px.ravel(), py.ravel()
    for th in thetas:
        s = (px * np.cos(th) + py * np.sin(th)) / ds + (n_bins - 1) / 2.0
        lo = np.floor(s).astype(np.intp)
        frac = s - lo
        # linear binning: each pixel splits its value between the two nearest detector bins
        idx = row + lo[nz_p]
        f_nz = frac[nz_p]
        prj = np.bincount(idx, weights * (1.0 - f_nz), minlength=z * n_bins)
        prj += np.bincount(idx + 1, weights * f_nz, minlength=z * n_bins)
        p = prj.reshape(z, n_bins) * ds
        err = -beta * p * p / (1.0 + p / SATURATION_MM)
        if starvation > 0.0:
            err += starvation * np.expm1(0.0095 * np.minimum(p, 150.0)) * rng.standard_normal(p.shape)
        q = np.fft.irfft(np.fft.rfft(err, n=2 * n_bins, axis=1) * freq, axis=1)[:, :n_bins].astype(np.float32)
        q_lo = q[:, lo]
        q_lo += (q[:, lo + 1] - q_lo) * frac.astype(np.float32)
        recon += q_lo
    recon *= 1000.0 * np.pi / n_angles              # relative attenuation -> HU
    recon = recon.reshape(z, hc, wc)
    if f > 1:   # back to the full grid: pixel i's centre lies at (i + 0.5) / f - 0.5 coarse pixels
        pos = (np.arange(h * 1.0) + 0.5) / f - 0.5
        recon = _resample_axis(recon, pos, 1)
        recon = _resample_axis(recon, (np.arange(w * 1.0) + 0.5) / f - 0.5, 2)
    return recon.astype(np.float32)


# --- the head ---------------------------------------------------------------------------------

def _ramp(x: np.ndarray) -> np.ndarray:
    """Smoothstep from 0 (x <= 0) to 1 (x >= 1)."""
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Head-from-scanner rotation: yaw about z, pitch (nodding) about x, roll about y."""
    cz, sz, cx, sx, cy, sy = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch), np.cos(roll), np.sin(roll)
    rz = np.array([[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]])
    ry = np.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
    return rz @ rx @ ry


@dataclass
class _HeadShape:
    """The cranial cavity, skull base and scalp of one patient in the head frame (mm).

    The cavity is an egg-shaped ellipsoid (wider posteriorly, outline harmonics for
    asymmetry) cut by the floor of the cranial fossae. The floor's steps are ramps about as
    wide as they are high (the sloping faces of the sphenoid ridge and petrous bones), so
    the vertical distance to the floor, times 0.7, is close to the true distance."""

    A: float        # half-width of the cavity (lateral)
    B: float        # half-length (antero-posterior)
    c_up: float     # vertical semi-axis above the centre
    c_low: float    # vertical semi-axis below it (the floor cuts it)
    vb: float       # antero-posterior offset of the cavity centre
    wc: float       # height of the cavity centre above the orbitomeatal plane
    egg: float      # widening towards the back
    eps: np.ndarray
    phase: np.ndarray
    f_ant: float    # floor heights: anterior fossa (orbital roofs),
    f_mid: float    # middle fossae,
    f_sella: float  # sella turcica,
    f_post: float   # posterior fossa

    def sd_ellipsoid(self, u, v, w) -> np.ndarray:
        """Approximate signed distance (mm, positive outside) to the inner table of the vault:
        (rho - 1) / |grad rho| for the ellipsoid's normalised radius rho."""
        vv = v - self.vb
        a = self.A * (1.0 + self.egg * vv / self.B)
        c = np.where(w > self.wc, np.float32(self.c_up), np.float32(self.c_low))
        x, y, z = u / a, vv / self.B, (w - self.wc) / c
        rho_xy = np.sqrt(x * x + y * y)
        cs, sn = x / np.maximum(rho_xy, 1e-6), y / np.maximum(rho_xy, 1e-6)
        c2, s2 = 2 * cs * cs - 1, 2 * cs * sn
        c3, s3 = cs * (4 * cs * cs - 3), sn * (3 - 4 * sn * sn)
        # the outline's harmonics fade towards the vertex, where a cut through a small cap
        # would magnify them into a clover
        fade = np.clip(1.0 - z * z, 0.0, 1.0)
        # Python floats: a NumPy float64 scalar would promote the float32 volumes (NEP 50)
        (e2, e3), (p2, p3) = map(float, self.eps), map(float, self.phase)
        outline = 1.0 + fade * (e2 * (c2 * math.cos(p2) - s2 * math.sin(p2))
                                + e3 * (c3 * math.cos(p3) - s3 * math.sin(p3)))
        rho = np.sqrt(x * x + y * y + z * z) / outline
        grad = np.sqrt((x / a) ** 2 + (y / self.B) ** 2 + (z / c) ** 2) / np.maximum(rho * outline, 1e-6)
        return (rho - 1.0) / np.maximum(grad, 1e-6)

    def floor(self, u, v):
        """Floor height F(u, v) of the cranial fossae, the posterior-fossa weight (0..1) and
        the weight of the petrous ridges and of the sphenoid body (where the base is thick).

        Each fossa is a bowl: the orbital roofs bulge up on either side of the cribriform
        plate, the middle fossae are deepest laterally, the posterior fossa at the back;
        the steps between them (sphenoid ridge, petrous ridges) are ramps."""
        un, vn = np.abs(u) / self.A, (v - self.vb) / self.B
        ant = self.f_ant + 5.0 * np.exp(-((un - 0.42) / 0.22) ** 2) - 6.0 * np.exp(-(un / 0.08) ** 2)
        mid = self.f_mid + np.minimum(10.0 * (((un - 0.62) / 0.35) ** 2 + ((vn + 0.12) / 0.28) ** 2), 14.0)
        lateral = _ramp((un - 0.1) / 0.22)                # sella between the middle fossae
        mid = self.f_sella + (mid - self.f_sella) * lateral
        behind_ant = _ramp((vn + 0.5) / 0.2)                 # sphenoid ridge
        ridge_v = -0.02 + 0.22 * un                           # petrous ridges run postero-laterally
        post = _ramp((vn - ridge_v) / 0.22)
        back = self.f_post + np.minimum(14.0 * ((un / 0.55) ** 2 + ((vn - 0.55) / 0.4) ** 2), 20.0)
        f = ant + (mid - ant) * behind_ant
        f = f + (back - f) * post
        petrous = 4.0 * post * (1.0 - post) * behind_ant * _ramp((un - 0.12) / 0.15)
        sphenoid = (1.0 - lateral) * behind_ant * (1.0 - post)
        return f, post, petrous, sphenoid


def _smooth_min(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """min(a, b) with the corner rounded over about k (polynomial smooth minimum)."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def _cells(rng, box_xyz, rot, centre, wavelength: float, width: float, edge: float) -> np.ndarray:
    """Bony septa (1 on a septum) of air cells in a box: the union of the zero sets of two
    narrow-band fields closes the cells. `width` is the septum half-width in mm; |f| / k
    is about the distance to a zero set."""
    xs, ys, zs = box_xyz
    k = 2.0 * np.pi / wavelength
    out = None
    for _ in range(2):
        dist = np.abs(WaveField(rng, 8, wavelength).on_grid(xs, ys, zs, rot, centre)) / k
        s = _soft((width - dist) / edge)
        out = s if out is None else np.maximum(out, s)
    return out


def _zero_set_distance(f: np.ndarray, dx: float, dz: float, wavelength: float) -> np.ndarray:
    """Distance (mm) to the zero set of a smooth field, |f| / |grad f|: uniform-width sulci
    and cortical ribbons where |f| alone would pool at saddle points. The gradient is
    floored at a third of the field's typical slope, 2 pi / wavelength."""
    g2 = np.gradient(f, dx, axis=2) ** 2 + np.gradient(f, dx, axis=1) ** 2
    if f.shape[0] > 1:
        g2 += np.gradient(f, dz, axis=0) ** 2
    return np.abs(f) / np.maximum(np.sqrt(g2), 2.0 * np.pi / wavelength / 3.0)


def make_head_phantom(rng: np.random.Generator, slices: int, size: int, noise: bool = True,
                      slice_thickness: float | None = None) -> FamilyPhantom:
    """One patient's axial head CT (float32 HU) with its haemorrhages as Findings."""
    # --- patient-level anatomy (head frame, mm) ------------------------------------------------
    scale = rng.uniform(0.86, 1.08)                      # small to large adult heads
    A = 66.0 * scale * rng.uniform(0.92, 1.06)
    B = 84.0 * scale * rng.uniform(0.92, 1.08)           # dolicho- to brachycephalic: B / A varies
    wc = 40.0 * scale + rng.uniform(-4.0, 4.0)
    f_mid = rng.uniform(-6.0, 2.0) * scale
    shape = _HeadShape(A=A, B=B, c_up=70.0 * scale * rng.uniform(0.92, 1.06), c_low=95.0 * scale,
                       vb=rng.uniform(-2.0, 6.0), wc=wc, egg=rng.uniform(0.03, 0.1),
                       eps=rng.uniform(0.0, 0.035, 2), phase=rng.uniform(0, 2 * np.pi, 2),
                       f_ant=wc - rng.uniform(14.0, 20.0) * scale, f_mid=f_mid,
                       f_sella=f_mid + rng.uniform(12.0, 16.0), f_post=f_mid - rng.uniform(22.0, 30.0) * scale)
    T0, base_t = rng.uniform(5.0, 8.0), rng.uniform(2.5, 4.0)
    t_outer, t_inner = rng.uniform(1.4, 2.2), rng.uniform(1.0, 1.6)
    cortical_hu, diploe_hu, petrous_hu = rng.uniform(1200.0, 1800.0), rng.uniform(400.0, 700.0), rng.uniform(1600.0, 2000.0)
    scalp, skin, fat = rng.uniform(3.5, 7.0), rng.uniform(1.2, 2.0), rng.uniform(1.0, 3.0)
    csf_hu, gm_hu = rng.uniform(2.0, 12.0), rng.uniform(36.0, 44.0)
    wm_hu = float(np.clip(gm_hu - rng.uniform(9.0, 14.0), 20.0, 30.0))
    atrophy = rng.uniform() ** 2                         # most patients young, some old
    sv = (rng.uniform(0.7, 1.1) + 0.8 * atrophy) * (1.7 if rng.random() < 0.05 else 1.0)
    yaw, pitch, roll = np.deg2rad(rng.uniform(-10.0, 10.0)), np.deg2rad(rng.uniform(-12.0, 12.0)), \
        np.deg2rad(rng.uniform(-5.0, 5.0))
    rot = _rotation(yaw, pitch, roll)
    xc, yc = rng.uniform(-10.0, 10.0), rng.uniform(-12.0, 8.0)
    centre = np.array([xc, yc, wc])

    fov = float(np.clip(2.0 * (B + T0 + scalp + 12.0) * rng.uniform(1.05, 1.2), 200.0, 300.0))
    dx = fov / size
    w_lo, w_top = shape.f_post - 8.0, wc + shape.c_up + T0 + scalp + 3.0
    coverage = w_top - w_lo
    dz = slice_spacing(coverage, slices, slice_thickness)
    span = slices * dz
    z0 = w_lo - (span - coverage) / 2.0 if span >= coverage else rng.uniform(w_lo, w_top - span)
    zs = (z0 + dz * np.arange(slices)).astype(np.float64)
    xs = (np.arange(size) - (size - 1) / 2.0) * dx
    ys = xs.copy()
    grid = _Grid(xs, ys, zs, dx)

    def to_scanner(q) -> tuple[float, float, float]:
        """A head-frame point (u, v, w) in scanner (LPS) coordinates."""
        p = centre + rot.T @ (np.asarray(q, np.float64) - np.array([0.0, 0.0, wc]))
        return float(p[0]), float(p[1]), float(p[2])

    X = (xs - xc).astype(np.float32)[None, None, :]
    Y = (ys - yc).astype(np.float32)[None, :, None]
    Z = (zs - wc).astype(np.float32)[:, None, None]
    r32 = rot.astype(np.float32)
    u = r32[0, 0] * X + r32[0, 1] * Y + r32[0, 2] * Z
    v = r32[1, 0] * X + r32[1, 1] * Y + r32[1, 2] * Z
    w = r32[2, 0] * X + r32[2, 1] * Y + r32[2, 2] * Z + np.float32(wc)
    del X, Y, Z
    un, vn = u / A, (v - shape.vb) / B

    # --- cavity, skull and scalp as signed distances ------------------------------------------
    sd_in = shape.sd_ellipsoid(u, v, w)
    floor, post, ridge, sphenoid = shape.floor(u, v)
    below = (floor - w) * 0.7
    sd_cav = np.maximum(sd_in, below)
    # the base is thin under the fossae, thick in the petrous pyramids and sphenoid body
    base_thick = base_t + 14.0 * ridge + 6.0 * sphenoid
    # thicker frontal and occipital bone, thin temporal squama, slow patient-specific variation
    thick = T0 * (0.8 + 0.3 * vn * vn - 0.3 * un * un * _ramp((shape.f_ant + 25.0 - w) / 30.0)) \
        + 0.9 * WaveField(rng, 6, 70.0).on_grid(xs, ys, zs, rot, centre)
    w_fs = shape.f_ant + rng.uniform(10.0, 16.0)
    has_frontal = rng.random() < 0.85                    # frontal sinus absent in some adults
    fs_depth = rng.uniform(4.0, 9.0) if has_frontal else 0.0
    thick += fs_depth * np.exp(-(u / 30.0) ** 2 - ((w - w_fs) / 16.0) ** 2) * _ramp((-vn - 0.55) / 0.2)
    mastoid_t = rng.uniform(6.0, 14.0)
    w_mast = shape.f_mid - rng.uniform(6.0, 12.0)
    thick += mastoid_t * np.exp(-((np.abs(un) - 0.86) / 0.14) ** 2 - ((vn - 0.14) / 0.15) ** 2
                                - ((w - w_mast) / 14.0) ** 2)
    np.maximum(thick, 2.5, out=thick)
    # blend the vault's and the base's thickness over a few mm where they meet (a hard
    # switch leaves a ragged step along the skull base)
    t_eff = base_thick + (thick - base_thick) * _ramp((sd_in - below) / 6.0 + 0.5)
    del base_thick, sphenoid
    temporalis = 7.0 * np.exp(-((np.abs(un) - 0.9) / 0.25) ** 2) * np.exp(-((w - shape.f_mid - 30.0) / 25.0) ** 2) \
        * _ramp((0.6 - vn) / 0.5)
    sd_skin_vault = sd_in - thick - scalp - temporalis
    # the face and neck below the cavity: an elliptic cylinder, cut off above where the
    # vault is wider anyway
    a_l, b_l, v_l = (A + T0 + scalp) * 0.93, (B + T0 + scalp) * 0.96, shape.vb + 0.04 * B
    rho = np.sqrt((u / a_l) ** 2 + ((v - v_l) / b_l) ** 2)
    sd_low = np.maximum(np.sqrt(u * u + (v - v_l) ** 2) * (1.0 - 1.0 / np.maximum(rho, 1e-3)), w - (wc - 5.0))
    sd_skin = _smooth_min(sd_skin_vault, sd_low, 10.0)
    del sd_skin_vault, sd_low, rho, temporalis

    hu = np.full(u.shape, AIR_HU, np.float32)
    inside = _soft(-sd_skin / dx)
    hu += (45.0 - AIR_HU) * inside
    fat_cov = _soft((-sd_skin - skin) / dx) * _soft((skin + fat + sd_skin) / dx)
    hu += (-100.0 - 45.0) * fat_cov
    # fat planes between the muscles of the face and neck, below the orbits
    deep = _soft((sd_cav - t_eff - 3.0) / dx) * _ramp((shape.f_ant - 8.0 - w) / 10.0) * inside
    fat_mix = np.clip((WaveField(rng, 24, 40.0).on_grid(xs, ys, zs, rot, centre) - 1.0) * 2.0, 0.0, 1.0) * deep
    hu += (-90.0 - hu) * fat_mix
    del fat_cov, deep, fat_mix

    # bone: cortical tables with diploe between; the petrous ridges densest. The base bone
    # stays within the vault's outline (no petrous bone through the scalp)
    bone_cov = _soft(sd_cav / dx) * _soft((t_eff - sd_cav) / dx) * _soft((thick - sd_in) / dx)
    depth_in, depth_out = sd_cav, t_eff - sd_cav
    cortex = np.maximum(_soft((t_inner - depth_in) / dx), _soft((t_outer - depth_out) / dx))
    texture = _smooth_field(rng, hu.shape, cells=max(4, size // 6))
    bone_hu = diploe_hu + 80.0 * texture + (cortical_hu - diploe_hu) * cortex
    bone_hu += (petrous_hu - bone_hu) * ridge * (w < shape.f_mid + 4.0)
    hu += (bone_hu - hu) * bone_cov
    del depth_in, depth_out, cortex, texture, bone_hu

    # --- brain ------------------------------------------------------------------------------------
    cav = _soft(-sd_cav / dx)
    c_sa = 0.8 + 2.5 * atrophy                           # subarachnoid space widens with age
    d = -sd_cav - c_sa                                   # depth below the brain surface
    wavelength = rng.uniform(22.0, 28.0)
    dist = _zero_set_distance(WaveField(rng, 20, wavelength).on_grid(xs, ys, zs, rot, centre), dx, dz, wavelength)
    sulc_half, ribbon = 0.5 + 1.5 * atrophy, rng.uniform(2.3, 3.0)
    sulc_depth = rng.uniform(12.0, 18.0) + 3.0 * WaveField(rng, 6, 60.0).on_grid(xs, ys, zs, rot, centre)
    gm = np.maximum(_soft((ribbon - d) / dx), _soft((sulc_half + ribbon - dist) / dx) * _soft((sulc_depth + ribbon - d) / dx))
    csf = np.maximum(_soft(-d / dx), _soft((sulc_half - dist) / dx) * _soft((sulc_depth - d) / dx))
    brain = wm_hu + (gm_hu - wm_hu) * gm + 1.5 * _smooth_field(rng, hu.shape, cells=max(4, size // 8))
    brain += (csf_hu - brain) * csf
    del gm, csf, dist

    # posterior fossa below the tentorium: cerebellum with finer folia
    w_tent = shape.f_mid + rng.uniform(6.0, 10.0) + rng.uniform(16.0, 22.0) * _ramp((0.95 - vn) / 0.85) - 8.0 * un * un
    cb = _soft((w_tent - w) / dx) * _ramp((post - 0.3) / 0.4)
    folia = _zero_set_distance(WaveField(rng, 16, 9.0).on_grid(xs, ys, zs, rot, centre), dx, dz, 9.0)
    cereb = wm_hu + 4.0 + (gm_hu - wm_hu - 4.0) * _soft((1.6 - folia) / dx)
    cereb += (csf_hu - cereb) * _soft(-d / dx)
    brain += (cereb - brain) * cb
    tent = _soft((0.8 - np.abs(w - w_tent)) / dx) * _ramp((post - 0.2) / 0.3) * _soft((d - 1.0) / dx)
    brain += (55.0 - brain) * tent
    del cb, folia, cereb, tent, w_tent

    # interhemispheric fissure (above the corpus callosum, down to the floor at the poles)
    # with the falx in it
    w_v = wc - rng.uniform(0.0, 8.0)                    # height of the ventricles' bodies
    w_cc = w_v + 12.0 * scale
    bottom = w_cc - (w_cc - shape.f_ant + 5.0) * _ramp((np.abs(vn - 0.05) - 0.3) / 0.35)
    u_mid = 2.0 * np.sin(vn * rng.uniform(1.0, 2.5) + rng.uniform(0, 2 * np.pi))   # a gently bowed midline
    fis_half = 1.0 + 1.5 * atrophy
    above = _soft((w - bottom) / dx) * _ramp((0.5 - post) / 0.3 + 1.0)
    fissure = _soft((fis_half - np.abs(u - u_mid)) / dx) * above
    brain += (csf_hu - brain) * fissure
    falx_hu = rng.uniform(55.0, 80.0) + (rng.uniform(80.0, 250.0) if rng.random() < 0.3 else 0.0)
    brain += (falx_hu - brain) * _soft((0.6 - np.abs(u - u_mid)) / dx) * above * _soft((d + c_sa) / dx)
    del fissure, above, bottom, u_mid

    layers = []                                          # (box, coverage, value) painted in order

    def add(cov, value) -> None:
        if cov is not None:
            layers.append((cov[0], cov[1], value))

    def ell(q, axes, angle=0.0, grow=0.0):
        return _ellipsoid(grid, to_scanner(q), axes, angle + yaw, grow)

    def cap(a, b, r0, r1):
        return _capsule(grid, to_scanner(a), to_scanner(b), r0, r1)

    vb = shape.vb
    for s in (-1.0, 1.0):
        # deep grey nuclei, insula and Sylvian fissure
        add(ell((s * (7.0 + 3.0 * sv), vb - 0.28 * B, w_v + 2.0), (4.0, 8.0, 9.0)), gm_hu)
        add(ell((s * 0.33 * A, vb - 0.12 * B, w_v - 6.0), (6.0, 15.0, 10.0), s * np.deg2rad(-12.0) + np.pi / 2), gm_hu - 2.0)
        add(ell((s * 9.0, vb + 0.05 * B, w_v - 7.0), (8.0, 12.0, 9.0)), gm_hu - 3.0)
        add(ell((s * 0.55 * A, vb - 0.1 * B, shape.f_mid + 22.0), (3.0, 0.2 * B, 14.0)), gm_hu)
        add(ell((s * 0.75 * A, vb - 0.12 * B, shape.f_mid + 22.0), (0.22 * A, 1.0 + 1.5 * atrophy, 12.0),
                -s * np.deg2rad(20.0)), csf_hu)
    # brainstem with its cisterns, fourth ventricle, suprasellar cistern
    r_bs = rng.uniform(11.0, 14.0) * scale
    bs_a, bs_b = (0.0, vb + 0.1 * B, shape.f_post - 5.0), (0.0, vb, w_v - 16.0)
    add(cap(bs_a, bs_b, r_bs + 2.5, r_bs * 0.85 + 2.5), csf_hu)
    add(cap(bs_a, bs_b, r_bs, r_bs * 0.85), wm_hu + 4.0)
    add(ell((0.0, vb + 0.1 * B + r_bs + 3.0, (shape.f_post + shape.f_mid) / 2.0 + 2.0), (6.0, 3.5, 8.0)), csf_hu)
    add(ell((0.0, vb - 0.12 * B, shape.f_sella + 8.0), (12.0, 9.0, 5.0)), csf_hu)
    # ventricles: each lateral ventricle a chain of tubes along its C-shaped course
    for s in (-1.0, 1.0):
        a_s = sv * rng.uniform(0.85, 1.15)           # the two sides differ a little
        course = [((s * 12.0, vb - 0.40 * B, w_v + 2.0), 3.0), ((s * 4.0, vb - 0.18 * B, w_v), 2.5),
                  ((s * 9.0, vb + 0.05 * B, w_v + 8.0), 4.0), ((s * 22.0, vb + 0.30 * B, w_v + 2.0), 6.0),
                  ((s * 16.0, vb + 0.52 * B, w_v + 3.0), 2.5)]
        temporal = [((s * 22.0, vb + 0.30 * B, w_v + 2.0), 5.0), ((s * 28.0, vb + 0.10 * B, w_v - 18.0), 2.5),
                    ((s * 28.0, vb - 0.12 * B, w_v - 26.0), 2.0)]
        for chain in (course, temporal):
            for (p0, r0), (p1, r1) in pairwise(chain):
                add(cap(p0, p1, r0 * a_s, r1 * a_s), csf_hu)
        if rng.random() < 0.5:                        # calcified choroid plexus in the atrium
            add(ell((s * 22.0, vb + 0.30 * B, w_v + 2.0), (2.5, 2.5, 2.5)), rng.uniform(100.0, 300.0))
    add(ell((0.0, vb + 0.02 * B, w_v - 12.0), (1.5 + 1.5 * sv, 0.16 * B, 9.0)), csf_hu)
    if rng.random() < 0.5:                            # calcified pineal gland
        add(ell((0.0, vb + 0.2 * B, w_v - 10.0), (2.5, 2.5, 2.5)), rng.uniform(100.0, 300.0))
    for box, c, value in layers:
        sub = brain[box]
        sub += (value - sub) * c

    placed = _place_haemorrhages(rng, brain, cav, sd_cav, grid, dz, gm_hu, wm_hu)
    hu += (brain - hu) * cav
    del brain, d

    # --- skull base, orbits and face (painted outside the cavity) ------------------------------------
    w_orb = shape.f_ant - rng.uniform(18.0, 21.0)
    u_orb = rng.uniform(30.0, 34.0) * scale
    front = v_l - b_l * np.sqrt(max(1.0 - (u_orb / a_l) ** 2, 0.05))   # skin in front of the globes
    r_g = rng.uniform(11.5, 12.5)
    v_g = front + r_g + rng.uniform(2.0, 4.0)
    outside_cav = 1.0 - cav
    bone_septum = rng.uniform(500.0, 900.0)

    def paint(cov, value, mask=True) -> None:
        if cov is None:
            return
        box, c = cov
        if mask:
            c = c * outside_cav[box]
        sub = hu[box]
        sub += (value - sub) * c

    def sinus(q, axes, wavelength, present=True, wall=1.5, fluid=None) -> None:
        """Air cells with bony septa in a bony shell; `fluid` (level, hu) fills the sinus below
        a horizontal air-fluid level (the patient lies supine, so the level is a constant y)."""
        if not present:
            return
        e = ell(q, axes)
        if e is None:
            return
        paint(ell(q, axes, grow=wall), bone_septum)
        box, c = e
        c = c * outside_cav[box]
        sz, sy, sx = box
        sept = _cells(rng, (xs[sx], ys[sy], zs[sz]), rot, centre, wavelength, 0.5, dx) if wavelength else 0.0
        sub = hu[box]
        sub += (bone_septum - sub) * c * sept
        sub += (AIR_HU - sub) * c * (1.0 - sept)
        if fluid is not None:
            level = to_scanner(q)[1] + fluid[0]
            wet = _soft((ys[sy][None, :, None] - level) / dx)
            sub += (fluid[1] - sub) * c * (1.0 - sept) * wet

    for s in (-1.0, 1.0):
        fluid = (rng.uniform(-6.0, 8.0), rng.uniform(10.0, 30.0)) if rng.random() < 0.15 else None
        sinus((s * 22.0, v_g + 14.0, w_orb - 33.0), (13.0, 16.0, 14.0), 0.0, fluid=fluid)
    sinus((0.0, v_l - b_l + 30.0, w_orb - 30.0), (8.0, 24.0, 14.0), 0.0)          # nasal cavity
    paint(ell((0.0, v_l - b_l + 30.0, w_orb - 30.0), (0.9, 24.0, 14.0)), 250.0)   # nasal septum
    sinus((0.0, v_g + 8.0, w_orb), (10.0, 18.0, 12.0), rng.uniform(7.0, 10.0))    # ethmoid cells
    sinus((0.0, v_g + 46.0, shape.f_sella - 10.0), (14.0, 13.0, 10.0), rng.uniform(18.0, 30.0),
          present=rng.random() < 0.95)                                          # sphenoid
    sinus((0.0, v_g + 58.0, shape.f_sella - 28.0), (12.0, 8.0, 10.0), 0.0, wall=0.0)  # nasopharynx
    pneum = rng.uniform(0.4, 1.1)                        # how far the mastoids are pneumatised
    for s in (-1.0, 1.0):
        q_m = (s * 0.86 * A, vb + 0.14 * B, w_mast)
        e = ell(q_m, (13.0 * pneum, 13.0 * pneum, 14.0 * pneum))
        if e is not None:
            box, c = e
            sz, sy, sx = box
            c = c * bone_cov[box]                     # the cells lie in the thickened bone
            sept = _cells(rng, (xs[sx], ys[sy], zs[sz]), rot, centre, rng.uniform(5.0, 7.0), 0.45, dx)
            sub = hu[box]
            sub += (AIR_HU - sub) * c * (1.0 - sept)
        # external auditory canal, in front of the mastoid
        paint(cap((s * (A + T0 + scalp + 8.0), vb + 0.02 * B, shape.f_mid - 4.0),
                  (s * 0.78 * A, vb + 0.02 * B, shape.f_mid - 4.0), 3.5, 3.0), AIR_HU)
    if has_frontal:
        v_fs = -np.sqrt(max(1.0 - ((w_fs - wc) / shape.c_up) ** 2, 0.1)) * B + vb - (T0 * 0.8 + fs_depth) / 2.0
        e = ell((0.0, v_fs, w_fs), (rng.uniform(10.0, 22.0), 0.3 * (T0 + fs_depth), rng.uniform(8.0, 14.0)))
        if e is not None:
            box, c = e
            sz, sy, sx = box
            c = c * _soft((sd_cav[box] - 1.2) / dx) * _soft((t_eff[box] - 1.5 - sd_cav[box]) / dx)
            sept = _cells(rng, (xs[sx], ys[sy], zs[sz]), rot, centre, 25.0, 0.5, dx)
            sub = hu[box]
            sub += (AIR_HU - sub) * c * (1.0 - sept)

    # below the posterior fossa: atlas ring and dens around the cord; zygomatic arches and
    # mandibular rami in front of the ear canals
    w_fm = shape.f_post - 4.0                             # foramen magnum
    cord_a, cord_b = (0.0, vb + 0.12 * B, w_fm), (0.0, vb + 0.14 * B, w_fm - 80.0)
    for radius, value in ((rng.uniform(14.0, 17.0), cortical_hu * 0.8), (10.0, 45.0), (8.0, csf_hu), (5.0, wm_hu + 5.0)):
        paint(cap(cord_a, cord_b, radius, radius), value)
    paint(ell((0.0, vb + 0.12 * B - 19.0, w_fm - 22.0), (7.0, 6.0, 16.0)), 500.0)      # dens and C2 body
    for s in (-1.0, 1.0):
        paint(cap((s * 0.62 * A, v_g + 12.0, w_orb - 22.0), (s * 0.95 * A, vb - 0.06 * B, shape.f_mid - 6.0), 3.0, 3.0),
              cortical_hu * 0.8)
        paint(cap((s * 0.84 * A, vb - 0.1 * B, shape.f_mid - 10.0), (s * 0.74 * A, vb - 0.14 * B, shape.f_mid - 70.0),
                  5.0, 5.5), cortical_hu * 0.9)
        paint(cap((s * 0.84 * A, vb - 0.1 * B, shape.f_mid - 10.0), (s * 0.74 * A, vb - 0.14 * B, shape.f_mid - 70.0),
                  2.5, 3.0), 300.0)                  # the ramus's marrow

    # orbits: bony cone, fat, recti, optic nerve, globe, lens
    for s in (-1.0, 1.0):
        apex, base = (s * 13.0, v_g + 40.0, w_orb), (s * u_orb, v_g + 2.0, w_orb + 2.0)
        paint(cap(apex, base, 4.0 + 2.0, 17.0 + 2.0), bone_septum)
        paint(cap(apex, base, 4.0, 17.0), -80.0)
        for side in (-1.0, 1.0):                      # medial and lateral rectus
            tip = (s * u_orb + side * (r_g - 1.0), v_g + 4.0, w_orb)
            paint(cap((apex[0] + side * 3.0, apex[1], w_orb), tip, 2.0, 2.8), 50.0)
        paint(cap(apex, (s * u_orb, v_g, w_orb), 2.2, 2.6), 30.0)
        paint(ell((s * u_orb, v_g, w_orb), (r_g + 0.8,) * 3), 40.0, mask=False)   # sclera
        paint(ell((s * u_orb, v_g, w_orb), (r_g,) * 3), rng.uniform(5.0, 15.0), mask=False)
        paint(ell((s * u_orb, v_g - r_g + 3.0, w_orb), (4.5, 2.0, 4.5)), rng.uniform(80.0, 120.0), mask=False)
    del sd_in, floor, post, ridge, below, bone_cov, u, v, w, un, vn

    _paint_head_holder(hu, grid, rng, xc, yc, B + T0 + scalp)

    hu = _blur_inplane(hu, (0.25, 0.5, 0.25))
    # beam hardening of the bone: what a scanner's water correction leaves uncorrected
    excess = np.clip((hu - 150.0) / 1000.0, 0.0, None)
    hu += projection_artefacts(excess, dx, rng, beta=rng.uniform(5e-4, 1.5e-3), n_angles=36, max_size=64)
    del excess
    if noise:
        add_noise(hu, rng, rng.uniform(1.5, 3.0), rng.uniform(2.0, 4.0))

    findings = [Finding(center_xyz_mm=tuple(map(float, c)),
                        center_zyx_vox=(float((c[2] - zs[0]) / dz), float((c[1] - ys[0]) / dx), float((c[0] - xs[0]) / dx)),
                        radius_mm=float(r), kind=kind, hu=float(h), extent_mm=ext)
                for c, r, kind, h, ext in placed]
    anatomy = {"tilt_deg": [round(float(np.rad2deg(a)), 2) for a in (yaw, pitch, roll)],
               "ventricle_scale": round(float(sv), 3), "atrophy": round(float(atrophy), 3)}
    return FamilyPhantom(hu=hu, origin_xyz_mm=(float(xs[0]), float(ys[0]), float(zs[0])),
                         spacing_zyx_mm=(dz, dx, dx), nodules=findings, family="head", body_part="HEAD",
                         anatomy=anatomy)


def _place_haemorrhages(rng, brain: np.ndarray, cav: np.ndarray, sd_cav: np.ndarray, grid: _Grid, dz: float,
                        gm_hu: float, wm_hu: float) -> list[tuple]:
    """Draw 0-2 acute haemorrhages into `brain`; returns (centre xyz, radius, type, hu, extent).

    Intraparenchymal: a lobulated blob of clotted blood (+60..+80 HU) deep in the
    parenchyma, larger ones with a rim of hypodense oedema. Subdural: a crescent between
    the inner table and the brain, thickest at its centre, over the convexity."""
    count = int(rng.choice(3, p=[0.55, 0.3, 0.15]))
    placed: list[tuple] = []
    if count == 0:
        return placed
    parenchyma = (cav > 0.99) & (brain > wm_hu - 6.0) & (brain < gm_hu + 6.0)
    xs, ys, zs = grid.xs, grid.ys, grid.zs
    for _ in range(count):
        kind = HAEMORRHAGE_TYPES[int(rng.random() < 0.4)]
        value = rng.uniform(60.0, 80.0)
        if kind == "intraparenchymal":
            radius = float(np.exp(rng.uniform(np.log(4.0), np.log(20.0))))
            ok = parenchyma & (sd_cav < -(radius + 4.0))
        else:
            radius = rng.uniform(2.5, 7.5)           # half the thickness at its thickest
            ok = (cav > 0.99) & (np.abs(sd_cav + radius) < 0.5 * grid.edge + 0.3) & (brain > wm_hu - 6.0)
        cand = np.flatnonzero(ok.ravel())
        if cand.size == 0:
            continue
        for _attempt in range(20):
            k, i, j = np.unravel_index(int(cand[rng.integers(cand.size)]), ok.shape)
            c = np.array([xs[j], ys[i], zs[k]])
            if any(np.linalg.norm(c - p[0]) < radius + p[1] + 6.0 for p in placed):
                continue
            if kind == "intraparenchymal":
                _draw_blob(brain, grid, c, radius, value, rng, edema=rng.uniform(12.0, 20.0) if radius > 6.0 else None)
                placed.append((c, radius, kind, value, None))
            else:
                extent = rng.uniform(35.0, 70.0)
                _draw_crescent(brain, sd_cav, grid, c, radius, extent, value)
                placed.append((c, radius, kind, value, float(extent)))
            break
    return placed


def _draw_blob(vol: np.ndarray, grid: _Grid, c, radius: float, value: float, rng, edema: float | None) -> None:
    """A lobulated ellipsoid (like a chest nodule) painted into `vol`, with an optional rim."""
    axes = radius * rng.uniform(0.8, 1.2, 3)
    lobes, phase = rng.uniform(0.0, 0.15), rng.uniform(0, 2 * np.pi)
    rim = 0.35 * radius if edema is not None else 0.0
    reach = axes.max() * (1.0 + lobes) + rim + grid.edge
    sx = _index_range(grid.xs, c[0] - reach, c[0] + reach)
    sy = _index_range(grid.ys, c[1] - reach, c[1] + reach)
    sz = _index_range(grid.zs, c[2] - reach, c[2] + reach)
    if sx.start >= sx.stop or sy.start >= sy.stop or sz.start >= sz.stop:
        return
    xx = (grid.xs[sx] - c[0]).astype(np.float32)[None, None, :] / axes[0]
    yy = (grid.ys[sy] - c[1]).astype(np.float32)[None, :, None] / axes[1]
    zz = (grid.zs[sz] - c[2]).astype(np.float32)[:, None, None] / axes[2]
    rho = np.sqrt(xx * xx + yy * yy)
    cs, sn = xx / np.maximum(rho, 1e-6), yy / np.maximum(rho, 1e-6)
    cos3 = cs * (4 * cs * cs - 3) * np.cos(phase) - sn * (3 - 4 * sn * sn) * np.sin(phase)
    q = np.sqrt(xx * xx + yy * yy + zz * zz) / (1.0 + lobes * cos3)
    sub = vol[sz, sy, sx]
    if edema is not None:
        sub += (edema - sub) * _soft((1.0 + rim / radius - q) * radius / grid.edge)
    sub += (value - sub) * _soft((1.0 - q) * radius / grid.edge)


def _draw_crescent(vol: np.ndarray, sd_cav: np.ndarray, grid: _Grid, c, half_thick: float, extent: float,
                   value: float) -> None:
    """A subdural haematoma: blood between the inner table (sd_cav = 0) and the brain,
    2 * half_thick thick at the centre c and thinning to nothing `extent` mm away, so its
    outer margin follows the skull (convex) and its inner one bulges into the brain."""
    reach = extent + grid.edge
    sx = _index_range(grid.xs, c[0] - reach, c[0] + reach)
    sy = _index_range(grid.ys, c[1] - reach, c[1] + reach)
    sz = _index_range(grid.zs, c[2] - reach, c[2] + reach)
    xx = (grid.xs[sx] - c[0]).astype(np.float32)[None, None, :]
    yy = (grid.ys[sy] - c[1]).astype(np.float32)[None, :, None]
    zz = (grid.zs[sz] - c[2]).astype(np.float32)[:, None, None]
    r2 = (xx * xx + yy * yy + zz * zz) / (extent * extent)
    thick = 2.0 * half_thick * np.sqrt(np.clip(1.0 - r2, 0.0, 1.0))
    sd = sd_cav[sz, sy, sx]
    cov = _soft((sd + thick) / grid.edge) * _soft(-sd / grid.edge) * (thick > 0)
    sub = vol[sz, sy, sx]
    sub += (value - sub) * cov


def _paint_head_holder(hu: np.ndarray, grid: _Grid, rng, xc: float, yc: float, reach: float) -> None:
    """The scanner's head holder: a curved carbon-fibre cradle under the occiput, with a
    foam pad between it and the head."""
    X = (grid.xs - xc).astype(np.float32)[None, :]
    Y = (grid.ys - yc).astype(np.float32)[:, None]
    e = grid.edge
    r_in = reach + rng.uniform(4.0, 10.0)
    thick = rng.uniform(3.0, 5.0)
    r = np.sqrt(X * X + Y * Y)
    behind = _soft((Y - 0.25 * r) / e)                  # the lower (posterior) part of the ring
    shell = _soft((r - r_in) / e) * _soft((r_in + thick - r) / e) * behind
    pad = _soft((r - r_in + rng.uniform(3.0, 6.0)) / e) * _soft((r_in - r) / e) * behind
    hu += (-900.0 - hu) * pad[None] * (hu < -500.0)     # the pad only fills air
    hu += (rng.uniform(150.0, 300.0) - hu) * shell[None]
