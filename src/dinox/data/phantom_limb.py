"""Procedural extremity-CT phantoms in Hounsfield units (the `limb` family of `dinox synth`).

A cross-section of a thigh (femur), a leg (tibia and fibula) or a forearm (radius and
ulna), of one limb or, for the lower limb, of both side by side, scanned along the limb's
long axis (scanner z, with a slight tilt). Like the chest and head phantoms
(dinox.data.phantom, dinox.data.phantom_head), everything is defined in patient
millimetres (DICOM LPS), so structures continue smoothly along z:

- skin over subcutaneous fat whose thickness varies around the limb and between patients
  (lean to obese);
- muscle groups: an additively weighted Voronoi partition of the space between the fat
  and the bones around per-muscle seeds that wander along z, separated by fat planes
  (the fascia between muscles), each group with its own attenuation, some patients with
  fatty infiltration (marbling);
- long bones: a cortical ring around a medullary cavity whose marrow changes along z
  (yellow, fatty marrow to red marrow), with a metaphyseal flare towards one end in some
  patients (wider bone, thin cortex, cancellous bone inside); an interosseous membrane
  between paired bones;
- vessels: arteries and veins in their neurovascular bundles and superficial veins in the
  fat, contrast-enhanced in about half of the patients (recorded like the chest's lung
  vessels);
- in some patients a metal implant (an intramedullary nail with locking screws, or a
  plate with screws), clipped to the image maximum of 3071 HU, with the streaks a metal
  object leaves in a filtered back-projection (beam hardening and photon starvation,
  `phantom_head.projection_artefacts`);
- findings, recorded in labels.json like chest nodules: lytic bone lesions (soft tissue
  replacing marrow and cortex, some with a sclerotic rim), soft-tissue masses (some with a
  necrotic centre) and intramuscular lipomas;
- the scanner table below the limb(s), and correlated noise.

Typical attenuation values, in HU at 120 kVp, from standard radiology references (the
Hounsfield-unit tables of e.g. Radiopaedia's "Hounsfield unit" article; Goodpaster et al.,
J. Appl. Physiol. 89, 2000 for skeletal muscle, about +30..+60, lower with fatty
infiltration; Kalender, "Computed Tomography", 3rd ed. 2011, for bone and metal): air
-1000; fat -100 (-120..-80); muscle +40..+60; skin +30..+55; yellow marrow about -50..0,
red marrow about +30..+60; cancellous bone +150..+400; cortical bone of the long bones
+1200..+1900; unenhanced blood +35..+50, arteries in an arterial-phase CT angiogram
+150..+300; titanium and steel far above the 12-bit scale's 3071 HU, so they are clipped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from dinox.data.phantom import AIR_HU, Vessel, _blur_inplane, _capsule, _Grid, _index_range, _paint_table, _soft, \
    slice_spacing
from dinox.data.phantom_head import FamilyPhantom, Finding, WaveField, _draw_blob, _ramp, add_noise, \
    projection_artefacts

LIMB_SITES = ("thigh", "leg", "forearm")
LIMB_FINDING_TYPES = ("lytic_bone", "soft_tissue_mass", "lipoma")
METAL_HU = 3071.0          # the stored maximum: metal is far denser and clips

# Per site: limb radius range (mm), segment length range (mm), in-plane aspect (ay / ax),
# subcutaneous fat range (mm); bones as (name, lateral, anterior offset in units of the limb
# radius, outer radius range mm, cortex range mm); muscle seeds as (angle in degrees, 0 =
# lateral, 90 = anterior, radius fraction); vessels as (lateral, anterior, radius range,
# kind) where a None position means a superficial vein in the fat at that angle.
_SITES = {
    "thigh": dict(radius=(60.0, 95.0), length=(120.0, 260.0), aspect=(0.85, 1.05), fat=(4.0, 35.0),
                  bones=[("femur", 0.1, 0.05, (12.0, 16.0), (4.0, 8.0))],
                  muscles=[(90, 0.62), (30, 0.62), (140, 0.55), (75, 0.32), (125, 0.82), (170, 0.55),
                           (215, 0.5), (188, 0.84), (320, 0.6), (258, 0.7), (238, 0.45)],
                  vessels=[((-0.32, 0.2), (3.5, 4.5), "artery"), ((-0.34, 0.1), (4.5, 6.0), "vein"),
                           ((-0.12, -0.22), (2.2, 3.0), "artery"), ((None, 175.0), (2.0, 3.0), "superficial")]),
    "leg": dict(radius=(45.0, 65.0), length=(100.0, 220.0), aspect=(0.8, 1.0), fat=(3.0, 20.0),
                bones=[("tibia", -0.2, 0.35, (11.0, 15.0), (3.0, 6.0)), ("fibula", 0.5, -0.05, (6.0, 8.0), (2.0, 3.0))],
                muscles=[(60, 0.5), (35, 0.65), (0, 0.7), (250, 0.3), (270, 0.55), (222, 0.75), (312, 0.75),
                         (205, 0.4)],
                vessels=[((0.15, 0.12), (1.4, 2.0), "artery"), ((-0.08, -0.28), (1.6, 2.2), "artery"),
                         ((-0.02, -0.32), (2.0, 2.8), "vein"), ((0.28, -0.25), (1.3, 1.8), "artery"),
                         ((None, 160.0), (1.8, 2.6), "superficial"), ((None, 272.0), (1.5, 2.2), "superficial")]),
    "forearm": dict(radius=(30.0, 42.0), length=(80.0, 160.0), aspect=(0.62, 0.8), fat=(2.0, 10.0),
                    bones=[("radius", 0.45, 0.0, (6.0, 9.0), (2.0, 3.0)), ("ulna", -0.42, -0.1, (6.0, 8.0), (2.0, 3.0))],
                    muscles=[(110, 0.6), (88, 0.42), (150, 0.62), (130, 0.25), (22, 0.6), (300, 0.6),
                             (232, 0.62), (48, 0.78)],
                    vessels=[((0.32, 0.55), (1.2, 1.6), "artery"), ((-0.3, 0.5), (1.2, 1.6), "artery"),
                             ((None, 35.0), (1.5, 2.2), "superficial"), ((None, 205.0), (1.5, 2.2), "superficial")]),
}


@dataclass
class _Bone:
    """One long bone: a cortical ring whose centre drifts along z, optionally flaring into a
    metaphysis towards one end of the segment."""

    name: str
    cx: float          # centre (scanner mm) at z = zm
    cy: float
    drift: tuple[float, float]   # centre drift per mm of z
    r_out: float
    cortex: float
    eps: tuple[float, float]     # 2nd and 3rd outline harmonics (linea aspera, tibial crest)
    phase: tuple[float, float]
    flare: float                 # extra radius fraction at the flared end
    flare_end: float             # z of the flared end
    flare_len: float
    marrow: tuple[float, float]  # marrow HU at the two ends of the segment
    zm: float
    length: float

    def centre(self, z):
        return self.cx + self.drift[0] * (z - self.zm), self.cy + self.drift[1] * (z - self.zm)

    def flaring(self, z):
        """0 on the diaphysis, 1 at the flared end."""
        if self.flare <= 0.0:
            return np.zeros_like(z)
        return _ramp(1.0 - np.abs(z - self.flare_end) / self.flare_len)

    def radius(self, z):
        return self.r_out * (1.0 + self.flare * self.flaring(z))

    def cortex_at(self, z):
        return np.maximum(self.cortex / (1.0 + 3.0 * self.flare * self.flaring(z)), 1.0)

    def sd(self, X, Y, z) -> np.ndarray:
        """Signed radial distance (mm, positive outside) to the outer cortical surface."""
        cx, cy = self.centre(z)
        u, v = X - cx, Y - cy
        r = np.sqrt(u * u + v * v)
        cs, sn = u / np.maximum(r, 1e-6), v / np.maximum(r, 1e-6)
        c2, s2 = 2 * cs * cs - 1, 2 * cs * sn
        c3, s3 = cs * (4 * cs * cs - 3), sn * (3 - 4 * sn * sn)
        outline = 1.0 + self.eps[0] * (c2 * math.cos(self.phase[0]) - s2 * math.sin(self.phase[0])) \
            + self.eps[1] * (c3 * math.cos(self.phase[1]) - s3 * math.sin(self.phase[1]))
        return r - self.radius(z) * outline


@dataclass
class _Limb:
    """One limb's outline: an ellipse with wavy harmonics that tapers and drifts along z."""

    side: float        # +1: the patient's left limb (lateral is +x), -1: right
    cx: float
    cy: float
    drift: tuple[float, float]
    ax: float
    ay: float
    taper: float       # relative change of the radii per segment length (positive: wider at the top)
    bulge: float       # calf-like bulge (relative) around t = 0.7
    eps: np.ndarray
    phase: np.ndarray
    twist: np.ndarray
    zm: float
    length: float

    def centre(self, z):
        return self.cx + self.drift[0] * (z - self.zm), self.cy + self.drift[1] * (z - self.zm)

    def scale(self, z):
        t = (z - self.zm) / self.length
        return 1.0 + self.taper * t + self.bulge * np.exp(-((t - 0.2) / 0.25) ** 2)

    def depth(self, X, Y, z) -> np.ndarray:
        """Radial distance (mm) inside the skin surface (negative outside)."""
        cx, cy = self.centre(z)
        s = self.scale(z)
        u, v = (X - cx) / (self.ax * s), (Y - cy) / (self.ay * s)
        rho = np.sqrt(u * u + v * v)
        cs, sn = u / np.maximum(rho, 1e-6), v / np.maximum(rho, 1e-6)
        c2, s2 = 2 * cs * cs - 1, 2 * cs * sn
        c3, s3 = cs * (4 * cs * cs - 3), sn * (3 - 4 * sn * sn)
        c4, s4 = 2 * c2 * c2 - 1, 2 * s2 * c2
        t = (z - self.zm) / self.length
        outline = 1.0
        for k, (ck, sk) in enumerate(((c2, s2), (c3, s3), (c4, s4))):
            ph = np.float32(self.phase[k]) + np.float32(self.twist[k]) * t     # float32 volumes stay float32
            outline = outline + float(self.eps[k]) * (ck * np.cos(ph) - sk * np.sin(ph))
        rho = rho / outline
        r_mm = np.sqrt((X - cx) ** 2 + (Y - cy) ** 2)
        return r_mm * (1.0 / np.maximum(rho, 1e-3) - 1.0)

    def local(self, a: float, b: float, z, radius: float):
        """Scanner (x, y) of the point `a` limb radii lateral and `b` anterior of the centre."""
        cx, cy = self.centre(z)
        s = self.scale(z)
        return cx + self.side * a * radius * s, cy - b * radius * s


def _site_limbs(rng, site: str, bilateral: bool, side: float, length: float, zm: float):
    spec = _SITES[site]
    r0 = rng.uniform(*spec["radius"])
    aspect = rng.uniform(*spec["aspect"])
    taper = {"thigh": rng.uniform(0.1, 0.35), "leg": rng.uniform(0.0, 0.15), "forearm": rng.uniform(0.15, 0.4)}[site]
    bulge = rng.uniform(0.05, 0.18) if site == "leg" else 0.0
    gap = rng.uniform(5.0, 40.0)
    sides = (-1.0, 1.0) if bilateral else (side,)
    limbs = []
    for s in sides:
        cx = s * (r0 + gap / 2.0) if bilateral else rng.uniform(-10.0, 10.0)
        limbs.append(_Limb(side=s, cx=cx + rng.uniform(-3.0, 3.0), cy=rng.uniform(-8.0, 8.0),
                           drift=(rng.uniform(-0.08, 0.08), rng.uniform(-0.06, 0.06)),
                           ax=r0 * rng.uniform(0.95, 1.05), ay=r0 * aspect * rng.uniform(0.95, 1.05),
                           taper=taper, bulge=bulge, eps=rng.uniform(0.01, 0.05, 3), phase=rng.uniform(0, 2 * np.pi, 3),
                           twist=rng.uniform(-1.0, 1.0, 3), zm=zm, length=length))
    return limbs, r0


def make_limb_phantom(rng: np.random.Generator, slices: int, size: int, noise: bool = True,
                      slice_thickness: float | None = None) -> FamilyPhantom:
    """One patient's extremity CT (float32 HU) with its findings. Without `slice_thickness`
    the limb segment is drawn to the length the slices cover; with it, at its own length
    (the site's), and the slices cover a window of it (or all of it and beyond)."""
    site = LIMB_SITES[int(rng.choice(3, p=[0.45, 0.35, 0.2]))]
    spec = _SITES[site]
    bilateral = site != "forearm" and rng.random() < 0.35
    side = 1.0 if rng.random() < 0.5 else -1.0
    length = rng.uniform(*spec["length"])
    dz = slice_spacing(length, slices, slice_thickness)
    if slice_thickness is None:
        extent, z0 = slices * dz, 0.0
    else:
        extent = max(length, slices * dz)
        z0 = rng.uniform(0.0, extent - slices * dz)
    zs = (z0 + dz * np.arange(slices)).astype(np.float64)
    zm = (extent - dz) / 2.0   # the middle of a slice grid over the whole extent
    limbs, r0 = _site_limbs(rng, site, bilateral, side, extent, zm)
    half_x = max(abs(lb.cx) + lb.ax * 1.15 for lb in limbs)
    half_y = max(abs(lb.cy) + lb.ay * 1.15 for lb in limbs)
    fov = float(np.clip(2.0 * max(half_x, half_y) * rng.uniform(1.1, 1.35), 90.0, 480.0))
    dx = fov / size
    xs = (np.arange(size) - (size - 1) / 2.0) * dx
    ys = xs.copy()
    grid = _Grid(xs, ys, zs, dx)
    X = xs.astype(np.float32)[None, None, :]
    Y = ys.astype(np.float32)[None, :, None]
    Zc = zs.astype(np.float32)[:, None, None]

    fat0 = rng.uniform(*spec["fat"])
    skin, skin_hu, fat_hu = rng.uniform(1.2, 2.2), rng.uniform(30.0, 55.0), rng.uniform(-110.0, -85.0)
    plane = rng.uniform(0.6, 1.6) + 0.04 * fat0            # fat between muscles widens with obesity
    marbling = rng.uniform(0.0, 0.5) if rng.random() < 0.3 else 0.0
    cortical_hu = rng.uniform(1200.0, 1900.0)
    contrast = rng.random() < 0.5
    artery_hu = rng.uniform(150.0, 300.0) if contrast else rng.uniform(35.0, 50.0)
    vein_hu = rng.uniform(60.0, 140.0) if contrast else rng.uniform(35.0, 50.0)

    hu = np.full((slices, size, size), AIR_HU, np.float32)
    inside = np.zeros_like(hu)                  # limb coverage, for placing findings
    muscle_zone = np.zeros_like(hu)
    bone_out = np.zeros_like(hu)                # inside an outer cortical surface
    marrow_zone = np.zeros_like(hu)
    bone_gap = np.full_like(hu, 1e3)            # mm to the nearest bone surface
    bones_all: list[_Bone] = []
    vessels: list[Vessel] = []
    paint_later = []                            # vessel layers (box, coverage, value)
    for limb in limbs:
        sx = _index_range(xs, limb.cx - limb.ax * 1.5 - 20.0, limb.cx + limb.ax * 1.5 + 20.0)
        Xs = X[..., sx]
        depth = limb.depth(Xs, Y, Zc)
        cov = _soft(depth / dx)
        sub = hu[..., sx]
        sub += (skin_hu - sub) * cov
        # subcutaneous fat: thicker on one side, slowly varying along the limb
        cxz, cyz = limb.centre(Zc)
        ang = np.arctan2(-(Y - cyz), limb.side * (Xs - cxz))        # 0 lateral, pi/2 anterior
        phi_f = rng.uniform(0, 2 * np.pi)
        fat_t = fat0 * (1.0 + 0.35 * np.cos(ang - phi_f) + 0.12 * np.cos(2 * ang - rng.uniform(0, 2 * np.pi)))
        fat_t = fat_t * (1.0 + 0.1 * WaveField(rng, 5, 80.0).on_grid(xs[sx], ys, zs, np.eye(3), (0.0, 0.0, 0.0)))
        deep_d = depth - skin - fat_t                               # depth below the deep fascia
        sub += (fat_hu - sub) * _soft((depth - skin) / dx)
        mz = _soft(deep_d / dx)
        np.maximum(inside[..., sx], cov, out=inside[..., sx])

        # bones of this limb
        bones = []
        for name, a, b, r_rng, c_rng in spec["bones"]:
            r_out = rng.uniform(*r_rng)
            bx, by = limb.local(a, b, zm, r0)
            flare_end = rng.choice([zs[0] - rng.uniform(0.0, 30.0), zs[-1] + rng.uniform(0.0, 30.0)])
            bones.append(_Bone(name=name, cx=float(bx), cy=float(by),
                               drift=(limb.drift[0] + rng.uniform(-0.05, 0.05), limb.drift[1] + rng.uniform(-0.03, 0.03)),
                               r_out=r_out, cortex=min(rng.uniform(*c_rng), 0.5 * r_out),
                               eps=(rng.uniform(0.02, 0.08), rng.uniform(0.0, 0.12) if name in ("tibia", "ulna") else rng.uniform(0.0, 0.04)),
                               phase=(rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi)),
                               flare=rng.uniform(0.3, 0.8) if rng.random() < 0.5 else 0.0,
                               flare_end=float(flare_end), flare_len=rng.uniform(40.0, 70.0),
                               marrow=(rng.uniform(-50.0, 60.0), rng.uniform(-50.0, 60.0)), zm=zm, length=extent))
        if site == "forearm":       # pronation turns the radius about the ulna
            turn = np.deg2rad(rng.uniform(-25.0, 25.0))
            rad, uln = bones
            ox, oy = rad.cx - uln.cx, rad.cy - uln.cy
            rad.cx = uln.cx + ox * math.cos(turn) - oy * math.sin(turn)
            rad.cy = uln.cy + ox * math.sin(turn) + oy * math.cos(turn)
        bones_all += bones

        # muscle groups: additively weighted Voronoi cells with fat planes between them. The
        # distance to a cell boundary is (d2 - d1) / |u1 - u2| (u: unit vectors to the two
        # nearest seeds), so the planes keep their width away from the seeds too.
        d1 = np.full(depth.shape, 1e4, np.float32)
        d2 = np.full(depth.shape, 1e4, np.float32)
        near = [np.zeros(depth.shape, np.float32) for _ in range(4)]    # x1, y1, x2, y2
        group_hu = np.zeros(depth.shape, np.float32)
        wander = rng.uniform(60.0, 160.0)
        for angle, frac in spec["muscles"]:
            th = math.radians(angle + rng.uniform(-12.0, 12.0)) + 0.15 * np.sin(Zc / wander + rng.uniform(0, 2 * np.pi))
            fr = frac + rng.uniform(-0.08, 0.08)
            px, py = limb.local(fr * np.cos(th), fr * np.sin(th), Zc, r0)
            dist = np.sqrt((Xs - px) ** 2 + (Y - py) ** 2) - np.float32(rng.uniform(-4.0, 4.0))
            closer = dist < d1
            second = ~closer & (dist < d2)
            x1, y1, x2, y2 = near
            np.copyto(x2, np.where(closer, x1, np.where(second, px, x2)))
            np.copyto(y2, np.where(closer, y1, np.where(second, py, y2)))
            np.copyto(x1, np.where(closer, px, x1))
            np.copyto(y1, np.where(closer, py, y1))
            np.copyto(d2, np.where(closer, d1, np.minimum(d2, dist)))
            np.copyto(d1, np.where(closer, dist, d1))
            group_hu[closer] = rng.uniform(40.0, 60.0)
        x1, y1, x2, y2 = near
        e1 = np.maximum(np.sqrt((Xs - x1) ** 2 + (Y - y1) ** 2), 1e-3)
        e2 = np.maximum(np.sqrt((Xs - x2) ** 2 + (Y - y2) ** 2), 1e-3)
        slope = np.sqrt(((Xs - x1) / e1 - (Xs - x2) / e2) ** 2 + ((Y - y1) / e1 - (Y - y2) / e2) ** 2)
        septum = _soft((plane / 2.0 - (d2 - d1) / np.maximum(slope, 0.3)) / dx)
        del near, x1, y1, x2, y2, e1, e2, slope
        muscle = group_hu - marbling * 60.0 * np.clip(
            WaveField(rng, 12, 18.0).on_grid(xs[sx], ys, zs, np.diag([1.0, 1.0, 0.25]), (0.0, 0.0, 0.0)) - 0.5, 0.0, 1.0)
        muscle += (fat_hu - muscle) * septum
        sub += (muscle - sub) * mz
        np.maximum(muscle_zone[..., sx], mz, out=muscle_zone[..., sx])
        del d1, d2, group_hu, septum, muscle, fat_t, ang

        # interosseous membrane between paired bones
        if len(bones) == 2:
            (ax_, ay_), (bx_, by_) = bones[0].centre(Zc), bones[1].centre(Zc)
            ex, ey = bx_ - ax_, by_ - ay_
            t = np.clip(((Xs - ax_) * ex + (Y - ay_) * ey) / (ex * ex + ey * ey), 0.0, 1.0)
            dm = np.sqrt((Xs - ax_ - t * ex) ** 2 + (Y - ay_ - t * ey) ** 2)
            sub += (60.0 - sub) * _soft((0.6 - dm) / dx) * mz
            del t, dm

        for bone in bones:
            sd = bone.sd(Xs, Y, Zc)
            outer = _soft(-sd / dx)
            cortex_t = bone.cortex_at(Zc)
            inner = _soft((-sd - cortex_t) / dx)
            tz = (Zc - zs[0]) / max(zs[-1] - zs[0], 1.0)
            marrow = bone.marrow[0] + (bone.marrow[1] - bone.marrow[0]) * tz
            fl = bone.flaring(Zc)
            cancellous = rng.uniform(150.0, 350.0) + 60.0 * WaveField(rng, 10, 6.0).on_grid(
                xs[sx], ys, zs, np.eye(3), (0.0, 0.0, 0.0))
            marrow = marrow + (cancellous - marrow) * fl
            sub += (cortical_hu - sub) * outer
            sub += (marrow - sub) * inner
            np.maximum(bone_out[..., sx], outer, out=bone_out[..., sx])
            np.maximum(marrow_zone[..., sx], inner, out=marrow_zone[..., sx])
            np.minimum(bone_gap[..., sx], np.abs(sd), out=bone_gap[..., sx])
            del sd, outer, inner, marrow, cancellous

        # vessels in their fat-lined bundles; superficial veins in the subcutaneous fat
        for (a, b), r_rng, kind in spec["vessels"]:
            radius = rng.uniform(*r_rng) * (0.85 + 0.3 * r0 / spec["radius"][1])
            value = artery_hu if kind == "artery" else vein_hu
            if a is None:
                th = np.deg2rad(b)
                rim = 1.0 / math.hypot(math.cos(th) / limb.ax, math.sin(th) / limb.ay)
                depth = max(0.3 * rim, rim - skin - 0.5 * fat0)        # mid-way through the fat
                a, b = depth * math.cos(th) / r0, depth * math.sin(th) / r0
                radius = min(radius, max(0.8, 0.4 * fat0))
            pts_z = np.linspace(zs[0] - 20.0, zs[-1] + 20.0, max(3, int(np.ceil((zs[-1] - zs[0] + 40.0) / 30.0)) + 1))
            wob = rng.uniform(0, 2 * np.pi, 2)
            pts = []
            for zk in pts_z:
                px, py = limb.local(a, b, zk, r0)
                pts.append((float(px + 2.0 * math.sin(zk / 40.0 + wob[0])), float(py + 2.0 * math.sin(zk / 50.0 + wob[1])),
                            float(zk)))
            for p0, p1 in pairwise(pts):
                if kind != "superficial":
                    c = _capsule(grid, p0, p1, radius + 1.5, radius + 1.5)
                    if c:
                        paint_later.append((c[0], c[1], fat_hu))
                c = _capsule(grid, p0, p1, radius, radius)
                if c:
                    paint_later.append((c[0], c[1], value))
                    vessels.append(Vessel(p0, p1, float(radius), float(radius)))
        del depth, cov, mz, deep_d
    for box, c, value in paint_later:
        sub = hu[box]
        sub += (value - sub) * c * (1.0 - bone_out[box])

    # --- metal implant (decided first: findings keep clear of it) --------------------------------
    implant = None
    metal = np.zeros_like(hu)                   # true attenuation of the metal above water
    if rng.random() < (0.25 if site != "forearm" else 0.1):
        implant = "nail" if site != "forearm" and rng.random() < 0.6 else "plate"
        density = rng.uniform(3.5, 5.0) if rng.random() < 0.6 else rng.uniform(10.0, 14.0)   # titanium / steel
        _add_implant(rng, metal, grid, bones_all[0], implant, density)
    placed = _place_findings(rng, hu, grid, dz, inside, muscle_zone, marrow_zone, bone_gap, bones_all, metal > 0.0)
    if implant is not None:
        # the metal's true attenuation (several thousand HU): after blur and beam hardening it
        # still exceeds the stored range and clips at 3071, its partial-volume rim too (the
        # blooming that makes metal look larger than it is)
        hu += (density * 1000.0 - hu) * np.clip(metal / density, 0.0, 1.0)

    hu = _blur_inplane(hu, (0.25, 0.5, 0.25))
    excess = np.clip((hu - 150.0) / 1000.0, 0.0, None)      # bone and the metal's true attenuation
    # metal streaks need finer angles and pixels than the bone's smooth beam hardening
    hu += projection_artefacts(excess, dx, rng, beta=rng.uniform(4e-4, 1e-3),
                               starvation=rng.uniform(1.5, 4.0) if implant else 0.0,
                               n_angles=64 if implant else 36, max_size=96 if implant else 64)
    del excess, metal
    if noise:
        add_noise(hu, rng, rng.uniform(5.0, 12.0), rng.uniform(5.0, 12.0))
    bottom = max(float(lb.centre(z)[1] + lb.ay * lb.scale(z) * 1.06) for lb in limbs for z in (zs[0], zs[-1]))
    _paint_table(hu, grid, rng, 0.0, bottom)
    np.clip(hu, -1024.0, METAL_HU, out=hu)     # metal (and streaks in air) beyond the stored range

    findings = [Finding(center_xyz_mm=tuple(map(float, c)),
                        center_zyx_vox=(float((c[2] - zs[0]) / dz), float((c[1] - ys[0]) / dx), float((c[0] - xs[0]) / dx)),
                        radius_mm=float(r), kind=kind, hu=float(h)) for c, r, kind, h in placed]
    anatomy = {"site": site, "bilateral": bool(bilateral), "side": "both" if bilateral else ("left" if side > 0 else "right"),
               "implant": implant, "contrast": bool(contrast), "bones": [b.name for b in bones_all]}
    body_part = {"thigh": "THIGH", "leg": "LEG", "forearm": "FOREARM"}[site]
    return FamilyPhantom(hu=hu, origin_xyz_mm=(float(xs[0]), float(ys[0]), float(zs[0])), spacing_zyx_mm=(dz, dx, dx),
                         nodules=findings, vessels=vessels, family="limb", body_part=body_part, anatomy=anatomy)


def _add_implant(rng, metal: np.ndarray, grid: _Grid, bone: _Bone, kind: str, density: float) -> None:
    """Accumulate the implant's metal (attenuation above water, relative) into `metal`."""
    zs = grid.zs
    z_a, z_b = zs[0] - 30.0, zs[-1] + 30.0
    parts = []
    if kind == "nail":
        r_n = max(4.0, (bone.r_out - bone.cortex) * rng.uniform(0.55, 0.8))
        a, b = (*bone.centre(z_a), z_a), (*bone.centre(z_b), z_b)
        parts.append((a, b, r_n, None))
        for _ in range(int(rng.integers(1, 3))):
            zk = rng.uniform(zs[0], zs[-1]) if len(zs) > 1 else zs[0]
            cx, cy = bone.centre(zk)
            th = rng.uniform(-0.35, 0.35) + (0.0 if rng.random() < 0.7 else np.pi / 2)
            reach = bone.r_out * 1.25
            parts.append(((cx - reach * math.cos(th), cy - reach * math.sin(th), zk),
                          (cx + reach * math.cos(th), cy + reach * math.sin(th), zk), 2.5, None))
    else:
        th = rng.uniform(0, 2 * np.pi)             # the plate lies on one face of the bone
        width = rng.uniform(10.0, 14.0)
        for zk in np.arange(z_a, z_b, 3.0):
            cx, cy = bone.centre(zk)
            r = bone.r_out + 2.0
            for off in np.linspace(-width / 2.0, width / 2.0, 5):
                ang = th + off / r
                p = (cx + r * math.cos(ang), cy + r * math.sin(ang), zk)
                q = (cx + r * math.cos(ang), cy + r * math.sin(ang), zk + 3.0)
                parts.append((p, q, 1.8, None))
        pitch = rng.uniform(12.0, 16.0)
        for zk in np.arange(z_a + rng.uniform(0.0, pitch), z_b, pitch):
            cx, cy = bone.centre(zk)
            reach = bone.r_out + 4.0
            parts.append(((cx + reach * math.cos(th), cy + reach * math.sin(th), zk),
                          (cx - reach * math.cos(th), cy - reach * math.sin(th), zk), 2.0, None))
    for a, b, r, _ in parts:
        c = _capsule(grid, a, b, r, r)
        if c:
            sub = metal[c[0]]
            np.maximum(sub, c[1] * density, out=sub)


def _place_findings(rng, hu: np.ndarray, grid: _Grid, dz: float, inside, muscle_zone, marrow_zone, bone_gap,
                    bones: list[_Bone], metal: np.ndarray) -> list[tuple]:
    """Draw 0-3 findings into `hu`; returns (centre xyz, radius, type, hu at the centre).

    Lytic bone lesion: soft tissue (+20..+50 HU) replacing marrow and, when large, the
    cortex, elongated along the bone, some with a sclerotic rim. Soft-tissue mass: a
    lobulated blob (+25..+45) in muscle, the larger ones with a necrotic centre (+5..+20).
    Lipoma: fat (-120..-80) with a thin capsule, in muscle. None touches the implant's metal
    (a lesion in a nailed bone lies beside the nail)."""
    count = int(rng.choice(4, p=[0.35, 0.35, 0.2, 0.1]))
    placed: list[tuple] = []
    xs, ys, zs = grid.xs, grid.ys, grid.zs

    def clear(c, radius: float) -> bool:
        """No metal within the finding's radius (sampled on a small in-plane cross)."""
        k = int(np.clip(round(np.interp(c[2], zs, np.arange(len(zs)))), 0, len(zs) - 1))
        for ox, oy in ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)):
            j = int(np.clip(round(np.interp(c[0] + ox * radius, xs, np.arange(len(xs)))), 0, len(xs) - 1))
            i = int(np.clip(round(np.interp(c[1] + oy * radius, ys, np.arange(len(ys)))), 0, len(ys) - 1))
            if metal[k, i, j]:
                return False
        return True

    for _ in range(count):
        kind = LIMB_FINDING_TYPES[int(rng.choice(3, p=[0.4, 0.4, 0.2]))]
        if kind == "lytic_bone":
            for _attempt in range(10):
                bone = bones[int(rng.integers(len(bones)))]
                k = int(rng.integers(len(zs)))
                z = zs[k] + rng.uniform(-0.5, 0.5) * dz
                cx, cy = bone.centre(z)
                r_b = float(bone.radius(z))
                radius = float(np.clip(r_b * rng.uniform(0.45, 1.0), 3.0, 18.0))
                off = rng.uniform(0.0, max(r_b - bone.cortex - 0.5 * radius, 0.0) * 0.6)
                th = rng.uniform(0, 2 * np.pi)
                c = np.array([cx + off * math.cos(th), cy + off * math.sin(th), z])
                if clear(c, 0.5 * radius) and not any(np.linalg.norm(c - p[0]) < radius + p[1] + 4.0 for p in placed):
                    break
            else:
                continue
            value = rng.uniform(20.0, 50.0)
            _draw_lesion(hu, grid, c, radius, value, rng, rim=rng.uniform(400.0, 700.0) if rng.random() < 0.3 else None,
                         bone_mask=np.clip(marrow_zone + (bone_gap < 2.0 + radius * 0.2), 0.0, 1.0))
            placed.append((c, radius, kind, value))
            continue
        radius = float(np.exp(rng.uniform(np.log(8.0), np.log(30.0)))) if kind == "soft_tissue_mass" \
            else rng.uniform(8.0, 22.0)
        ok = (muscle_zone > 0.99) & (bone_gap > radius + 3.0)
        depth_ok = np.flatnonzero(ok.ravel())
        if depth_ok.size == 0:
            continue
        for _attempt in range(30):
            k, i, j = np.unravel_index(int(depth_ok[rng.integers(depth_ok.size)]), ok.shape)
            c = np.array([xs[j], ys[i], zs[k]])
            off = int(round(radius / grid.edge))
            h, w = ok.shape[1:]
            probes = [(i, min(j + off, w - 1)), (i, max(j - off, 0)), (min(i + off, h - 1), j), (max(i - off, 0), j)]
            if min(inside[k, pi, pj] for pi, pj in probes) < 0.99:
                continue
            if any(np.linalg.norm(c - p[0]) < radius + p[1] + 4.0 for p in placed) or not clear(c, radius):
                continue
            if kind == "soft_tissue_mass":
                value = rng.uniform(25.0, 45.0)
                _draw_blob(hu, grid, c, radius, value, rng, edema=None)
                if radius > 15.0 and rng.random() < 0.5:
                    value = rng.uniform(5.0, 20.0)
                    _draw_blob(hu, grid, c, radius * rng.uniform(0.35, 0.5), value, rng, edema=None)
            else:
                value = rng.uniform(-120.0, -80.0)
                _draw_blob(hu, grid, c, radius + 1.0, 60.0, rng, edema=None)   # capsule
                _draw_blob(hu, grid, c, radius, value, rng, edema=None)
            placed.append((c, radius, kind, value))
            break
    return placed


def _draw_lesion(hu: np.ndarray, grid: _Grid, c, radius: float, value: float, rng, rim: float | None,
                 bone_mask: np.ndarray) -> None:
    """A lytic lesion: an ellipsoid elongated along the bone, painted where there is bone
    (marrow and cortex), so that a large lesion thins or breaks the cortex."""
    axes = (radius * rng.uniform(0.85, 1.0), radius * rng.uniform(0.85, 1.0), radius * rng.uniform(1.2, 2.0))
    reach_xy, reach_z = max(axes[:2]) + 2.0 + grid.edge, axes[2] + 2.0
    sx = _index_range(grid.xs, c[0] - reach_xy, c[0] + reach_xy)
    sy = _index_range(grid.ys, c[1] - reach_xy, c[1] + reach_xy)
    sz = _index_range(grid.zs, c[2] - reach_z, c[2] + reach_z)
    if sx.start >= sx.stop or sy.start >= sy.stop or sz.start >= sz.stop:
        return
    xx = (grid.xs[sx] - c[0]).astype(np.float32)[None, None, :] / axes[0]
    yy = (grid.ys[sy] - c[1]).astype(np.float32)[None, :, None] / axes[1]
    zz = (grid.zs[sz] - c[2]).astype(np.float32)[:, None, None] / axes[2]
    q = np.sqrt(xx * xx + yy * yy + zz * zz)
    mask = bone_mask[sz, sy, sx]
    sub = hu[sz, sy, sx]
    if rim is not None:
        sub += (rim - sub) * _soft((1.0 + 1.5 / radius - q) * radius / grid.edge) * mask
    sub += (value - sub) * _soft((1.0 - q) * radius / grid.edge) * np.maximum(mask, _soft((0.6 - q) * radius / grid.edge))
