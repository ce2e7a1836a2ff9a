"""Calibrations that travel with 4D-STEM data.

Conventions used everywhere in the package:

- Data are ordered ``[scan_y, scan_x, ky, kx]``; scan coordinates are in Å, detector
  coordinates in mrad.
- ``step_A`` is the probe step ``(y, x)`` in Å; ``mrad_per_px`` the detector sampling
  ``(ky, kx)`` in mrad per pixel; ``center_px`` the position ``(ky, kx)`` of the undeflected
  beam (zero scattering angle) in detector pixels, ``None`` meaning "estimate from the data".
- ``scan_rotation_deg`` is the angle from the detector axes to the scan axes (0 for simulations).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml


def _pair(value: Any, name: str) -> tuple[float, float]:
    """Return ``value`` as a ``(y, x)`` pair of positive floats."""
    arr = np.atleast_1d(np.asarray(value, dtype=float))
    if arr.size == 1:
        arr = np.repeat(arr, 2)
    if arr.shape != (2,) or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"{name} must be a positive number or a (y, x) pair, got {value!r}")
    return float(arr[0]), float(arr[1])


@dataclass(frozen=True)
class Calibration:
    """Scan and detector calibration of a 4D-STEM dataset.

    Parameters
    ----------
    step_A : tuple of float
        Probe step ``(y, x)`` in Å.
    mrad_per_px : tuple of float
        Detector sampling ``(ky, kx)`` in mrad per pixel.
    center_px : tuple of float or None
        Zero-angle position ``(ky, kx)`` in detector pixels; ``None`` = estimate from data.
    energy_keV : float
        Beam energy in keV.
    scan_rotation_deg : float
        Rotation from detector axes to scan axes, degrees (counter-clockwise).
    extra : dict
        Free-form metadata carried along (e.g. camera length, source file).
    """

    step_A: tuple[float, float] = (1.0, 1.0)
    mrad_per_px: tuple[float, float] = (1.0, 1.0)
    center_px: tuple[float, float] | None = None
    energy_keV: float = 200.0
    scan_rotation_deg: float = 0.0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "step_A", _pair(self.step_A, "step_A"))
        object.__setattr__(self, "mrad_per_px", _pair(self.mrad_per_px, "mrad_per_px"))
        if self.center_px is not None:
            c = np.asarray(self.center_px, dtype=float)
            if c.shape != (2,) or not np.all(np.isfinite(c)):
                raise ValueError(f"center_px must be a finite (ky, kx) pair, got {self.center_px!r}")
            object.__setattr__(self, "center_px", (float(c[0]), float(c[1])))
        if not np.isfinite(self.energy_keV) or self.energy_keV <= 0:
            raise ValueError(f"energy_keV must be positive, got {self.energy_keV!r}")
        if not np.isfinite(self.scan_rotation_deg):
            raise ValueError("scan_rotation_deg must be finite")

    def to_dict(self) -> dict:
        """Plain-python dict (YAML/JSON friendly)."""
        d = asdict(self)
        d["step_A"] = list(self.step_A)
        d["mrad_per_px"] = list(self.mrad_per_px)
        d["center_px"] = None if self.center_px is None else list(self.center_px)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        """Build from a dict such as :meth:`to_dict` writes; unknown keys are an error."""
        known = {"step_A", "mrad_per_px", "center_px", "energy_keV", "scan_rotation_deg", "extra"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown calibration keys {sorted(unknown)}; allowed: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Calibration:
        """Read a YAML calibration sidecar."""
        with open(path) as fh:
            d = yaml.safe_load(fh) or {}
        if not isinstance(d, dict):
            raise ValueError(f"{path}: a calibration file must hold a mapping")
        return cls.from_dict(d)
