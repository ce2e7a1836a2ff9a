"""Toy PACBED thickness series shared by test_pacbed.py and test_cli_experimental.py.

A smooth CBED-like pattern as a function of scattering angle (mrad) and thickness (nm): a
bright-field disc of 20 mrad, fringes whose spacing and phase change with thickness, and a
thickness-dependent diffuse (TDS-like) background. Not physics; just a library with a unique,
smoothly varying best match.
"""

from __future__ import annotations

import numpy as np
import xarray as xr


def toy_cbed(theta_mrad, t_nm):
    """Toy CBED intensity at scattering angle ``theta_mrad`` for thickness ``t_nm``."""
    disc = 1.0 / (1.0 + np.exp((theta_mrad - 20.0) / 0.8))
    fringes = 1.0 + 0.4 * np.cos(theta_mrad * (0.25 + 0.012 * t_nm) + 0.05 * t_nm)
    tds = 0.02 * (1 + 0.05 * t_nm) * np.exp(-theta_mrad / (15.0 + 0.8 * t_nm))
    return disc * fringes + tds


def toy_pattern(shape, mrad, center, t):
    """Toy pattern on a (ky, kx) grid of ``mrad`` per pixel with the beam at ``center`` (px)."""
    ky = (np.arange(shape[0]) - center[0]) * mrad
    kx = (np.arange(shape[1]) - center[1]) * mrad
    return toy_cbed(np.hypot(ky[:, None], kx[None, :]), t)


def toy_library(ts, shape=(97, 101), mrad=0.8, center=(48.0, 50.0)) -> xr.DataArray:
    """Thickness series ``(thickness, ky, kx)`` of toy patterns, ky/kx coordinates in mrad."""
    lib = np.stack([toy_pattern(shape, mrad, center, t) for t in ts])
    return xr.DataArray(lib, dims=("thickness", "ky", "kx"), coords={
        "thickness": ts, "ky": (np.arange(shape[0]) - center[0]) * mrad,
        "kx": (np.arange(shape[1]) - center[1]) * mrad})
