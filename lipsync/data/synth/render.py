"""The mouth renderer: a base frame with its lower face replaced by an articulated one.

Per output frame (``R x R``), for base footage frame ``t``, clip augmentation ``A`` (cache ->
output pixels) and mouth parameters ``(open, width, round, teeth, tongue)``:

1. The base frame is ``frames[t]`` warped by ``A`` (the head, eyes, blinks, light: real footage).
2. The lower face (the footage's feathered region mask, from under the nose to below the chin)
   is taken from the *reference frame* (a closed mouth), placed by the frame's
   ``ref_to_frame`` affine and deformed by the mouth parameters. The deformation is a smooth,
   invertible displacement field in mouth coordinates (see :mod:`lipsync.data.synth.faces`):

   - the lower lip, chin and jaw move down by ``open * jaw`` (the jaw field falls off sideways
     towards the jaw angles and below the chin into the neck; at the lip seam it follows a lens
     profile that is 0 at the mouth corners, so the corners stay together);
   - the upper lip moves up by ``open * upper`` (same lens profile, fading towards the nose);
   - the corners move in or out with ``width`` and ``round`` (a horizontal scaling of the mouth
     area), and ``round`` thickens (protrudes) the lips and narrows the opening into an "o".

   Each output pixel is mapped back (fixed-point inversion of the field, on the upper or lower
   side of the opened seam) to a pixel of the reference frame, which is sampled with bilinear
   interpolation (``cv2.remap``).
3. The opening between the two lip edges (the *hole*) is shaded procedurally in the same
   coordinates: dark mouth cavity (from the lips' colour), upper teeth below the upper lip
   (visible height grows with ``teeth``), lower teeth above the lower lip, the tongue rising
   with ``tongue`` (between the teeth for TH), a shadow along the inner lip edges, anti-aliased
   edges.
4. The pasted region gets a per-channel gain (mean colour of the base frame over mean colour of
   the patch on the upper part of the feather ring, smoothed over time) so lighting changes of
   the footage carry over, and is alpha-blended with the feathered mask.
5. The clip's colour augmentation is applied to the whole frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from lipsync.data.synth.faces import ColourTransform, Footage

__all__ = ["MouthModel", "MouthRenderer"]


@dataclass(frozen=True)
class MouthModel:
    """Constants of the deformation, in mouth units (half the mouth width)."""

    jaw: float = 0.95  # lower lip drop at open = 1
    upper: float = 0.22  # upper lip raise at open = 1
    lower_band: float = 0.5  # how far below the seam the lens profile holds
    upper_band: float = 0.45  # how far above the seam the upper lip raise reaches
    jaw_sigma: float = 2.3  # sideways fall-off of the jaw field
    neck: float = 1.6  # fall-off of the jaw field below the chin
    spread: float = 0.4  # corner movement per unit of (width - 0.45)
    rounding: float = 0.24  # corner movement inwards at round = 1
    protrusion: float = 0.35  # lip thickening at round = 1
    teeth_span: float = 0.75  # half-width of the visible teeth row
    upper_teeth: float = 0.3  # visible upper teeth height at teeth = 1
    lower_teeth: float = 0.12


class MouthRenderer:
    """Renders the frames of one clip (keeps the lighting gain between frames)."""

    def __init__(self, footage: Footage, out_size: int, model: MouthModel | None = None) -> None:
        self.footage = footage
        self.size = int(out_size)
        self.model = model or MouthModel()
        geo = footage.geometry
        self.geo = geo
        self.seam_u = np.asarray(geo.seam_u)
        self.seam_v = np.asarray(geo.seam_v)
        self.ref = np.ascontiguousarray(footage.frames[footage.ref_index])
        self.region = footage.region
        # mouth units -> reference cache pixels, and its inverse, as 3x3 matrices
        to_px = np.eye(3)
        to_px[:2, 0] = np.asarray(geo.axis_u) * geo.unit
        to_px[:2, 1] = np.asarray(geo.axis_v) * geo.unit
        to_px[:2, 2] = geo.origin
        self.mouth_to_ref = to_px
        ys, xs = np.nonzero(self.region > 0.004)
        corners = np.array([[xs.min(), ys.min()], [xs.max(), ys.min()], [xs.min(), ys.max()],
                            [xs.max(), ys.max()]], np.float64)  # fmt: skip
        ref_to_mouth = cv2.invertAffineTransform(to_px[:2])
        self.region_uv = corners @ ref_to_mouth[:, :2].T + ref_to_mouth[:, 2]
        lip = np.asarray(geo.lip_colour, np.float64)
        skin = np.asarray(geo.skin_colour, np.float64)
        light = float(np.clip((skin @ [0.299, 0.587, 0.114]) / 170.0, 0.55, 1.2))
        self.cavity = lip * 0.2
        self.teeth = np.array([236.0, 228.0, 212.0]) * light
        self.tongue = np.clip(lip * np.array([1.02, 0.78, 0.82]), 0, 255)
        self._gain: np.ndarray | None = None

    # -- deformation ----------------------------------------------------------------------------

    def _seam(self, u: np.ndarray) -> np.ndarray:
        return np.interp(u, self.seam_u, self.seam_v).astype(u.dtype, copy=False)

    @staticmethod
    def _lens(u: np.ndarray, half: float, power: float) -> np.ndarray:
        return np.clip(1.0 - (u / half) ** 2, 0.0, 1.0) ** power

    def _shape(self, params: np.ndarray) -> tuple[float, float, float, float, float]:
        m = self.model
        opening, width, rnd = float(params[0]), float(params[1]), float(params[2])
        s = m.spread * (width - 0.45) - m.rounding * rnd
        half = 0.98 - 0.3 * rnd
        power = 0.55 - 0.15 * rnd
        return opening, s, rnd, half, power

    def _displacement(
        self, u: np.ndarray, v: np.ndarray, lower: np.ndarray, shape: tuple
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Forward displacement ``(du, dv)`` at reference mouth coordinates ``(u, v)`` on the
        given side of the seam, and ``d(du)/du``, ``d(dv)/dv`` (for the Newton steps of the
        inversion)."""
        m = self.model
        opening, s, rnd, half, power = shape
        d = v - self._seam(u)
        d = np.where(lower, np.maximum(d, 0.0), np.minimum(d, 0.0))
        free = (d != 0).astype(d.dtype)  # d follows v (not clamped at the seam)
        beyond = np.maximum(np.abs(u) - 1.0, 0.0)
        gx = np.exp(-(beyond**2) / 0.36)
        e_du = np.exp(-((d / 1.1) ** 2))
        du = s * u * gx * e_du
        ddu = s * e_du * gx * (1 - 2 * np.abs(u) * beyond / 0.36)
        e_prot = np.exp(-((d / 0.5) ** 2))
        dv = m.protrusion * rnd * d * e_prot * gx
        ddv = m.protrusion * rnd * gx * e_prot * (1 - 8 * d * d) * free
        lens = self._lens(u, half, power)
        # lower side: lips follow the lens profile near the seam, the jaw further down
        lam = np.exp(-((d / m.lower_band) ** 2))
        below = np.maximum(v - self.geo.chin_v, 0.0)
        jaw = np.exp(-((u / m.jaw_sigma) ** 2) - (below / m.neck) ** 2)
        lo = opening * m.jaw * ((1 - lam) * jaw + lam * lens)
        dlam = -2 * d / m.lower_band**2 * lam * free
        djaw = -2 * below / m.neck**2 * jaw
        dlo = opening * m.jaw * (dlam * (lens - jaw) + (1 - lam) * djaw)
        # upper side: the upper lip rises near the seam
        e_up = np.exp(-((d / m.upper_band) ** 2))
        up = -opening * m.upper * e_up * lens
        dup = opening * m.upper * lens * e_up * 2 * d / m.upper_band**2 * free
        dv = dv + np.where(lower, lo, up)
        ddv = ddv + np.where(lower, dlo, dup)
        return du, dv, ddu, ddv

    def _invert(
        self, uq: np.ndarray, vq: np.ndarray, lower: np.ndarray, shape: tuple, steps: int = 5
    ) -> tuple[np.ndarray, np.ndarray]:
        """Reference mouth coordinates whose displaced position is ``(uq, vq)``: Newton steps
        along each axis (the cross derivatives are small and left out)."""
        u, v = uq.copy(), vq.copy()
        for _ in range(steps):
            du, dv, ddu, ddv = self._displacement(u, v, lower, shape)
            u = u - (u + du - uq) / np.maximum(1.0 + ddu, 0.3)
            v = v - (v + dv - vq) / np.maximum(1.0 + ddv, 0.3)
        return u, v

    def _hole_edges(self, shape: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The opened seam in deformed coordinates: ``(u', top', bottom')`` along the seam."""
        m = self.model
        opening, s, _, half, power = shape
        u = np.linspace(-1.6, 1.6, 161)
        seam = self._seam(u)
        gx = np.exp(-(np.maximum(np.abs(u) - 1.0, 0.0) ** 2) / 0.36)
        lens = self._lens(u, half, power)
        ud = u + s * u * gx
        return ud, seam - opening * m.upper * lens, seam + opening * m.jaw * lens

    # -- rendering ------------------------------------------------------------------------------

    def render(self, index: int, affine: np.ndarray, params: np.ndarray) -> np.ndarray:
        """One output frame (R, R, 3) uint8 before colour augmentation (see the module doc)."""
        R = self.size
        footage = self.footage
        base = cv2.warpAffine(
            np.asarray(footage.frames[index]),
            affine,
            (R, R),
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_REFLECT_101,
        )
        # output pixels -> deformed reference mouth coordinates
        a3 = np.vstack([affine, [0, 0, 1]])
        m3 = np.vstack([footage.ref_to_frame[index], [0, 0, 1]])
        mouth_to_out = a3 @ m3 @ self.mouth_to_ref
        out_to_mouth = np.vstack([cv2.invertAffineTransform(mouth_to_out[:2]), [0, 0, 1]])
        shape = self._shape(params)
        opening = shape[0]
        # bounding box of the (possibly opened) region in output pixels
        corners = self.region_uv.copy()
        corners[2:, 1] += opening * self.model.jaw
        pts = (mouth_to_out @ np.c_[corners, np.ones(4)].T)[:2].T
        x0, y0 = np.floor(pts.min(0)).astype(int) - 1
        x1, y1 = np.ceil(pts.max(0)).astype(int) + 2
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, R), min(y1, R)
        if x1 <= x0 or y1 <= y0:
            return base
        gx, gy = np.meshgrid(
            np.arange(x0, x1, dtype=np.float32), np.arange(y0, y1, dtype=np.float32)
        )  # float32: twice as fast as float64, far more precise than a pixel
        k = out_to_mouth.astype(np.float32)
        uq = k[0, 0] * gx + k[0, 1] * gy + k[0, 2]
        vq = k[1, 0] * gx + k[1, 1] * gy + k[1, 2]
        # which side of the opened seam
        ud, top, bottom = self._hole_edges(shape)
        top_q = np.interp(uq, ud, top).astype(np.float32)
        bot_q = np.interp(uq, ud, bottom).astype(np.float32)
        lower = vq > (top_q + bot_q) / 2
        u, v = self._invert(uq, vq, lower, shape)
        px = self.mouth_to_ref
        map_x = (px[0, 0] * u + px[0, 1] * v + px[0, 2]).astype(np.float32)
        map_y = (px[1, 0] * u + px[1, 1] * v + px[1, 2]).astype(np.float32)
        patch = cv2.remap(
            self.ref, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
        )
        alpha = cv2.remap(self.region, map_x, map_y, cv2.INTER_LINEAR, borderValue=0.0)
        patch = patch.astype(np.float32)
        # the hole
        lin = out_to_mouth[:2, :2]
        units_per_px = float(np.sqrt(abs(lin[0, 0] * lin[1, 1] - lin[0, 1] * lin[1, 0])))
        from_top = vq - top_q
        from_bot = bot_q - vq
        # coverage of each pixel by the opening; an opening thinner than a pixel shows as much
        hole = np.clip(np.minimum(from_top, from_bot) / units_per_px + 0.5, 0.0, 1.0)
        hole *= np.clip((bot_q - top_q) / units_per_px, 0.0, 1.0)
        inside = hole > 0
        if inside.any():
            inner = self._shade(uq[inside], from_top[inside], from_bot[inside], shape, params)
            h = hole[inside][:, None].astype(np.float32)
            patch[inside] = patch[inside] * (1 - h) + inner * h
            alpha = np.maximum(alpha, hole.astype(np.float32))
        # lighting gain from the upper feather ring
        region_roi = base[y0:y1, x0:x1].astype(np.float32)
        ring = (alpha > 0.15) & (alpha < 0.85) & ~lower
        if ring.sum() >= 20:
            gain = region_roi[ring].mean(0) / np.maximum(patch[ring].mean(0), 1.0)
            gain = np.clip(gain, 0.75, 1.33)
        else:
            gain = np.ones(3, np.float32)
        self._gain = gain if self._gain is None else 0.5 * self._gain + 0.5 * gain
        patch *= self._gain.astype(np.float32)
        a = alpha[..., None]
        out = base.copy()
        out[y0:y1, x0:x1] = np.clip(region_roi * (1 - a) + patch * a + 0.5, 0, 255).astype(np.uint8)
        return out

    def _shade(
        self,
        u: np.ndarray,
        from_top: np.ndarray,
        from_bot: np.ndarray,
        shape: tuple,
        params: np.ndarray,
    ) -> np.ndarray:
        """Colours (n, 3) of the inner mouth at hole pixels (deformed mouth coordinates)."""
        m = self.model
        opening = shape[0]
        teeth_p, tongue_p = float(params[3]), float(params[4])
        height = from_top + from_bot
        col = np.repeat(self.cavity[None], len(u), 0)
        depth = np.clip(1.0 - np.abs(u) / 1.2, 0.0, 1.0)
        col *= (0.75 + 0.35 * depth)[:, None]
        # tongue: an ellipse rising from the lower lip
        t_h = np.maximum(height * (0.3 + 0.6 * tongue_p), 1e-6)
        tongue = (u / 0.55) ** 2 + ((from_bot - 0.0) / t_h) ** 2 < 1.0
        tshade = np.clip(1.0 - 0.5 * (u / 0.55) ** 2, 0.4, 1.0)
        col[tongue] = self.tongue * tshade[tongue, None]
        # teeth
        span = np.abs(u) < m.teeth_span
        upper = span & (from_top < m.upper_teeth * teeth_p)
        lower = span & (from_bot < m.lower_teeth * teeth_p * min(1.0, opening / 0.3)) & ~upper
        tooth = np.clip(1.0 - 0.55 * (u / m.teeth_span) ** 2, 0.3, 1.0)
        gaps = np.array([0.0, 0.21, -0.21, 0.4, -0.4])
        gap = np.min(np.abs(u[:, None] - gaps[None]), axis=1) < 0.01
        tooth = np.where(gap, tooth * 0.88, tooth)
        col[upper] = self.teeth * tooth[upper, None]
        col[lower] = self.teeth * 0.88 * tooth[lower, None]
        # shadow along the inner lip edges
        edge = np.minimum(from_top, from_bot)
        col *= (0.7 + 0.3 * np.clip(edge / 0.06, 0.0, 1.0))[:, None]
        return col.astype(np.float32)

    def frame(self, index: int, affine: np.ndarray, params: np.ndarray, colour: ColourTransform):
        """:meth:`render` followed by the clip's colour augmentation."""
        return colour(self.render(index, affine, params))
