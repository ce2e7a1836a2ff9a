"""Detector geometry, virtual detectors (Eq. 2) and centre of mass / iCoM."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ._kernels import fast_for, moments
from ._pcc import _check_masks, _pass_apply
from ._stream import check_data, check_finite_result, iter_row_chunks


def _pair(value: Any, name: str) -> tuple[float, float]:
    arr = np.atleast_1d(np.asarray(value, dtype=float))
    if arr.size == 1:
        arr = np.repeat(arr, 2)
    if arr.shape != (2,) or not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be a finite number or (y, x) pair, got {value!r}")
    return float(arr[0]), float(arr[1])


def _det_shape(det_shape: Any) -> tuple[int, int]:
    shp = tuple(int(s) for s in det_shape)
    if len(shp) != 2 or min(shp) < 1:
        raise ValueError(f"det_shape must be (ky, kx) with positive sizes, got {det_shape!r}")
    return shp  # type: ignore[return-value]


def _calib(center_px, mrad_per_px, calibration, det_shape):
    """Resolve center/sampling from explicit arguments or a Calibration-like object."""
    if calibration is not None:
        if center_px is None:
            center_px = getattr(calibration, "center_px", None)
        if mrad_per_px is None:
            mrad_per_px = getattr(calibration, "mrad_per_px", None)
    if center_px is None:
        center_px = (det_shape[0] // 2, det_shape[1] // 2)
    if mrad_per_px is None:
        mrad_per_px = 1.0
    mpp = _pair(mrad_per_px, "mrad_per_px")
    if min(mpp) <= 0:
        raise ValueError(f"mrad_per_px must be positive, got {mrad_per_px!r}")
    return _pair(center_px, "center_px"), mpp


def scattering_angle_mrad(
    det_shape: Any,
    *,
    center_px: Any = None,
    mrad_per_px: Any = None,
    calibration: Any = None,
) -> np.ndarray:
    """Scattering angle of every detector pixel, ``(ky, kx)`` float64 in mrad.

    ``center_px`` ``(ky, kx)`` is the undeflected-beam position in pixels; None means
    ``(ky // 2, kx // 2)`` (the zero frequency of an ``fftshift``-ed pattern).
    ``mrad_per_px`` is a number or ``(ky, kx)`` pair (default 1: angles in pixels).
    ``calibration`` (a :class:`~tmask_validate.calibration.Calibration`) supplies whichever
    of the two is not given.
    """
    shp = _det_shape(det_shape)
    (cy, cx), (my, mx) = _calib(center_px, mrad_per_px, calibration, shp)
    ky = (np.arange(shp[0]) - cy) * my
    kx = (np.arange(shp[1]) - cx) * mx
    return np.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2)


def annular_mask(
    det_shape: Any,
    *,
    inner_mrad: float,
    outer_mrad: float,
    center_px: Any = None,
    mrad_per_px: Any = None,
    calibration: Any = None,
) -> np.ndarray:
    """Binary annular detector: ``inner_mrad <= angle < outer_mrad`` (bool ``(ky, kx)``).

    ``outer_mrad`` may be ``np.inf`` (to the detector edge); ``inner_mrad=0`` gives a disc.
    """
    if not (np.isfinite(inner_mrad) and inner_mrad >= 0):
        raise ValueError(f"inner_mrad must be finite and >= 0, got {inner_mrad!r}")
    if not outer_mrad > inner_mrad:
        raise ValueError(f"outer_mrad ({outer_mrad}) must exceed inner_mrad ({inner_mrad})")
    theta = scattering_angle_mrad(det_shape, center_px=center_px, mrad_per_px=mrad_per_px,
                                  calibration=calibration)
    return (theta >= inner_mrad) & (theta < outer_mrad)


def virtual_detector_masks(
    det_shape: Any,
    detectors: Mapping[str, tuple[float, float]] | None = None,
    *,
    center_px: Any = None,
    mrad_per_px: Any = None,
    calibration: Any = None,
    semiangle_mrad: float | None = None,
) -> dict[str, np.ndarray]:
    """Binary annular masks for named virtual detectors.

    Parameters
    ----------
    detectors : dict name -> (inner_mrad, outer_mrad), optional
        E.g. ``{"BF": (0, 20), "ABF": (11, 23.5), "ADF": (40, np.inf)}``.  If None,
        ``semiangle_mrad`` (α) is required and BF = (0, α), ABF = (α/2, α),
        ADF = (2α, inf) are made.

    Returns
    -------
    dict name -> bool ndarray (ky, kx)
    """
    if detectors is None:
        if semiangle_mrad is None or not semiangle_mrad > 0:
            raise ValueError("give detectors={name: (inner_mrad, outer_mrad)} or semiangle_mrad")
        a = float(semiangle_mrad)
        detectors = {"BF": (0.0, a), "ABF": (a / 2, a), "ADF": (2 * a, np.inf)}
    out = {}
    for name, lim in detectors.items():
        inner, outer = (float(v) for v in lim)
        out[str(name)] = annular_mask(det_shape, inner_mrad=inner, outer_mrad=outer,
                                      center_px=center_px, mrad_per_px=mrad_per_px,
                                      calibration=calibration)
    return out


def virtual_images(
    data: Any, masks: Mapping[str, Any] | Any, *, chunk_bytes: int | None = None
) -> dict[str, np.ndarray] | np.ndarray:
    """Apply many detector masks to the raw data in ONE streaming pass (Eq. 2).

    Parameters
    ----------
    masks : dict name -> (ky, kx) array, or array (ky, kx) / (k, ky, kx)
        Binary or weighted masks.

    Returns
    -------
    dict name -> (scan_y, scan_x) float64, or an array shaped like the input stack
        ``s_j = Σ_k D_jk mask_k`` (plain sum, float64 accumulation).
    """
    info = check_data(data)
    if isinstance(masks, Mapping):
        if not masks:
            raise ValueError("masks is empty")
        names = list(masks)
        w, _ = _check_masks(np.stack([np.asarray(masks[k]) for k in names]), info)
        img = _pass_apply(data, info, w, np.zeros(info.n), chunk_bytes)
        return {k: img[i].reshape(info.scan_shape) for i, k in enumerate(names)}
    w, single = _check_masks(masks, info)
    img = _pass_apply(data, info, w, np.zeros(info.n), chunk_bytes).reshape(
        (-1, *info.scan_shape))
    return img[0] if single else img


# ----------------------------------------------------------------------------- CoM / iCoM
def _com_moments(data: Any, chunk_bytes: int | None):
    """One pass: per-pattern total, Σ ky·x and Σ kx·x (detector index units), (3, m)."""
    info = check_data(data)
    mom = np.empty((info.m, 3))
    fast = fast_for(info.m * info.n)
    for r0, x in iter_row_chunks(data, info, chunk_bytes):
        moments(x, info.det_shape, mom[r0 : r0 + x.shape[0]], fast=fast)
    check_finite_result(mom)
    return info, np.ascontiguousarray(mom.T)


def center_of_mass(
    data: Any,
    *,
    center_px: Any = None,
    mrad_per_px: Any = None,
    chunk_bytes: int | None = None,
    return_origin: bool = False,
) -> np.ndarray | tuple[np.ndarray, tuple[float, float]]:
    """Centre of mass of every diffraction pattern, one streaming pass.

    Convention: the CoM is the intensity-weighted mean detector position of each pattern
    (divided by the pattern's total intensity) MINUS an origin, with detector index
    increasing towards +k (``ky`` ↔ scan y, ``kx`` ↔ scan x).  For an attractive (positive)
    projected potential the beam is deflected towards the atom, so the CoM vector points
    from the probe position towards the atom; it is ``+∇φ/2π`` of the object phase φ.

    Parameters
    ----------
    center_px : (ky, kx), optional
        Origin in detector pixels.  None: the centroid of the position-averaged pattern
        (PACBED), which is computed in the same pass.
    mrad_per_px : float or (ky, kx), optional
        If given the result is in mrad, else in detector pixels.
    return_origin : bool
        Also return the origin used (pixels).

    Returns
    -------
    ndarray (2, scan_y, scan_x) float64
        ``[0]`` = y (ky) component, ``[1]`` = x (kx) component.  Patterns with zero total
        intensity give 0.
    """
    info, mom = _com_moments(data, chunk_bytes)
    tot, my, mx = mom
    if center_px is None:
        ttot = tot.sum()
        if ttot != 0:
            origin = (float(my.sum() / ttot), float(mx.sum() / ttot))
        else:
            origin = ((info.det_shape[0] - 1) / 2, (info.det_shape[1] - 1) / 2)
    else:
        origin = _pair(center_px, "center_px")
    com = np.zeros((2, info.m))
    ok = tot != 0
    com[0, ok] = my[ok] / tot[ok] - origin[0]
    com[1, ok] = mx[ok] / tot[ok] - origin[1]
    if mrad_per_px is not None:
        mpp = _pair(mrad_per_px, "mrad_per_px")
        com[0] *= mpp[0]
        com[1] *= mpp[1]
    com = com.reshape((2, *info.scan_shape))
    return (com, origin) if return_origin else com


def estimate_center_px(data: Any, *, chunk_bytes: int | None = None) -> tuple[float, float]:
    """Centroid ``(ky, kx)`` in pixels of the position-averaged diffraction pattern."""
    _, origin = center_of_mass(data, chunk_bytes=chunk_bytes, return_origin=True)
    return origin


def _mirror_extend(gy: np.ndarray, gx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Extend a gradient field by even reflection of the potential (2x in each axis)."""
    gy_top = np.concatenate([gy, gy[:, ::-1]], axis=1)
    gy_e = np.concatenate([gy_top, -gy_top[::-1]], axis=0)
    gx_top = np.concatenate([gx, -gx[:, ::-1]], axis=1)
    gx_e = np.concatenate([gx_top, gx_top[::-1]], axis=0)
    return gy_e, gx_e


def integrated_center_of_mass(
    data_or_com: Any,
    *,
    step_A: Any = (1.0, 1.0),
    pad: str | None = "mirror",
    highpass: float = 0.0,
    rotation_deg: float = 0.0,
    center_px: Any = None,
    mrad_per_px: Any = None,
    chunk_bytes: int | None = None,
) -> np.ndarray:
    """Integrated centre of mass (iCoM): the potential-like image whose gradient is the CoM.

    Solves ``∇Φ = CoM`` in the least-squares sense by Fourier integration,
    ``Φ̂(q) = (q_y Ĉ_y + q_x Ĉ_x) / (2πi (|q|² + highpass²))`` with ``Φ̂(0) = 0``
    (``q`` in 1/Å from ``step_A``).  With the CoM convention of :func:`center_of_mass`
    atoms (positive projected potential) come out BRIGHT.

    Parameters
    ----------
    data_or_com : array
        4D data (CoM computed with ``center_px``/``mrad_per_px``) or a CoM field
        ``(2, scan_y, scan_x)`` as returned by :func:`center_of_mass`.
    step_A : float or (y, x)
        Probe step in Å.
    pad : {"mirror", "zero", None}
        "mirror": the field is extended by reflection (potential even about the edges,
        gradient components normal to an edge change sign) to 2x size, which removes edge
        artefacts of non-periodic scans; "zero": zero padding to 2x; None: treat the scan as
        periodic.
    highpass : float
        Tikhonov high-pass wavenumber in 1/Å (0 = none); suppresses long-range drifts.
    rotation_deg : float
        Rotation applied to the CoM vectors (detector → scan frame), counter-clockwise in
        the (x, y) = (axis 1, axis 0) plane: ``x' = x cos θ - y sin θ``,
        ``y' = x sin θ + y cos θ``.

    Returns
    -------
    ndarray (scan_y, scan_x) float64
        Units of CoM units x Å (arbitrary scale, proportional to the projected phase);
        zero mean over the (padded) field.
    """
    arr = data_or_com
    ndim = len(np.shape(arr))
    if ndim == 4:
        com = center_of_mass(arr, center_px=center_px, mrad_per_px=mrad_per_px,
                             chunk_bytes=chunk_bytes)
    elif ndim == 3 and np.shape(arr)[0] == 2:
        com = np.asarray(arr, dtype=np.float64)
    else:
        raise ValueError(
            f"expected 4D data or a CoM field (2, scan_y, scan_x), got shape {np.shape(arr)}"
        )
    if not np.all(np.isfinite(com)):
        raise ValueError("CoM field contains NaN or Inf")
    step = _pair(step_A, "step_A")
    if min(step) <= 0:
        raise ValueError(f"step_A must be positive, got {step_A!r}")
    if not (np.isfinite(highpass) and highpass >= 0):
        raise ValueError(f"highpass must be finite and >= 0, got {highpass!r}")
    gy, gx = com[0], com[1]
    if rotation_deg:
        th = np.deg2rad(rotation_deg)
        gx, gy = gx * np.cos(th) - gy * np.sin(th), gx * np.sin(th) + gy * np.cos(th)
    sy, sx = gy.shape
    if pad == "mirror":
        gy_p, gx_p = _mirror_extend(gy, gx)
    elif pad == "zero":
        gy_p = np.zeros((2 * sy, 2 * sx))
        gx_p = np.zeros((2 * sy, 2 * sx))
        gy_p[:sy, :sx] = gy
        gx_p[:sy, :sx] = gx
    elif pad is None or pad == "none":
        gy_p, gx_p = gy, gx
    else:
        raise ValueError(f"unknown pad {pad!r}; expected 'mirror', 'zero' or None")
    ny, nx = gy_p.shape
    qy = np.fft.fftfreq(ny, d=step[0])[:, None]
    qx = np.fft.fftfreq(nx, d=step[1])[None, :]
    q2 = qy**2 + qx**2 + highpass**2
    q2[0, 0] = 1.0
    num = qy * np.fft.fft2(gy_p) + qx * np.fft.fft2(gx_p)
    phi_hat = num / (2j * np.pi * q2)
    phi_hat[0, 0] = 0.0
    phi = np.fft.ifft2(phi_hat).real
    return np.ascontiguousarray(phi[:sy, :sx])
