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

from tmask_validate.config import read_yaml


def _is_number(value: Any) -> bool:
    """A real number (int or float, numpy included), not a bool or a string."""
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool | np.bool_)


def _numbers(value: Any, name: str) -> np.ndarray:
    """``value`` (a number or a list of numbers) as a float array; anything else is an error
    (``True`` is not 1 and ``"0.4"`` is not 0.4)."""
    items = list(value) if isinstance(value, list | tuple | np.ndarray) else [value]
    bad = [v for v in items if not _is_number(v)]
    if bad or not items:
        raise ValueError(f"{name} must be a number or a list of numbers, got {value!r}")
    return np.asarray(items, dtype=float)


def _pair(value: Any, name: str) -> tuple[float, float]:
    """Return ``value`` as a ``(y, x)`` pair of positive floats."""
    arr = _numbers(value, name)
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
    step_A : tuple of float or None
        Probe step ``(y, x)`` in Å; ``None``: the scan is uncalibrated (pixel units), never
        assumed to be 1 Å.
    mrad_per_px : tuple of float or None
        Detector sampling ``(ky, kx)`` in mrad per pixel; ``None``: the detector is
        uncalibrated (pixel units).
    center_px : tuple of float or None
        Zero-angle position ``(ky, kx)`` in detector pixels; ``None`` = estimate from data.
    energy_keV : float
        Beam energy in keV.
    scan_rotation_deg : float
        Rotation from detector axes to scan axes, degrees (counter-clockwise).
    extra : dict
        Free-form metadata carried along (e.g. camera length, source file).
    """

    step_A: tuple[float, float] | None = None
    mrad_per_px: tuple[float, float] | None = None
    center_px: tuple[float, float] | None = None
    energy_keV: float = 200.0
    scan_rotation_deg: float = 0.0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.step_A is not None:
            object.__setattr__(self, "step_A", _pair(self.step_A, "step_A"))
        if self.mrad_per_px is not None:
            object.__setattr__(self, "mrad_per_px", _pair(self.mrad_per_px, "mrad_per_px"))
        if self.center_px is not None:
            c = _numbers(self.center_px, "center_px")
            if c.shape != (2,) or not np.all(np.isfinite(c)):
                raise ValueError(
                    f"center_px must be a finite (ky, kx) pair, got {self.center_px!r}"
                )
            object.__setattr__(self, "center_px", (float(c[0]), float(c[1])))
        for name in ("energy_keV", "scan_rotation_deg"):
            value = getattr(self, name)
            if not _is_number(value) or not np.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.energy_keV <= 0:
            raise ValueError(f"energy_keV must be positive, got {self.energy_keV!r}")
        if not isinstance(self.extra, dict):
            raise ValueError(f"extra must be a mapping, got {self.extra!r}")

    @property
    def scan_calibrated(self) -> bool:
        """True when the probe step is known (scan coordinates in Å)."""
        return self.step_A is not None

    @property
    def detector_calibrated(self) -> bool:
        """True when the detector sampling is known (detector coordinates in mrad)."""
        return self.mrad_per_px is not None

    def require(self, *, scan: bool = False, detector: bool = False, what: str = "this") -> None:
        """Raise a one-line ValueError when ``what`` needs an axis the calibration lacks."""
        missing = []
        if scan and self.step_A is None:
            missing.append("the scan step (step_A / step_nm, or --step-A)")
        if detector and self.mrad_per_px is None:
            missing.append("the detector sampling (mrad_per_px, or camera_length_mm + "
                           "pixel_size_um, or --mrad-per-px)")
        if missing:
            raise ValueError(f"{what} needs {' and '.join(missing)}: the calibration does not "
                             f"give it (that axis is uncalibrated)")

    def to_dict(self) -> dict:
        """Plain-python dict (YAML/JSON friendly)."""
        d = asdict(self)
        d["step_A"] = None if self.step_A is None else list(self.step_A)
        d["mrad_per_px"] = None if self.mrad_per_px is None else list(self.mrad_per_px)
        d["center_px"] = None if self.center_px is None else list(self.center_px)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        """Build from a dict such as :meth:`to_dict` writes; unknown keys are an error."""
        if not isinstance(d, dict):
            raise ValueError(f"a calibration must be a mapping, got {type(d).__name__}")
        known = {"step_A", "mrad_per_px", "center_px", "energy_keV", "scan_rotation_deg", "extra"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(
                f"unknown calibration keys {sorted(unknown)}; allowed: {sorted(known)}"
            )
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Calibration:
        """Read a YAML calibration sidecar."""
        d = read_yaml(path, what="calibration file") or {}
        if not isinstance(d, dict):
            raise ValueError(f"{path}: a calibration file must hold a mapping")
        try:
            return cls.from_dict(d)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None


# ----------------------------------------------------------------------------------------------
# helpers for experimental data (sidecar YAML files, CLI flags); the dataclass above is unchanged
# ----------------------------------------------------------------------------------------------

#: keys accepted in a calibration sidecar on top of the :class:`Calibration` fields
SIDECAR_EXTRA_KEYS = ("camera_length_mm", "pixel_size_um", "step_nm")


def mrad_per_px_from_camera_length(camera_length_mm: float, pixel_size_um: float) -> float:
    """Detector angular sampling from the camera length and the physical pixel size.

    Small-angle geometry: one pixel of size ``p`` at distance ``L`` subtends ``p / L`` rad, so
    ``mrad_per_px = pixel_size_um / camera_length_mm`` (the 1e-6 / 1e-3 units give mrad).

    Parameters
    ----------
    camera_length_mm : float
        Effective camera length in mm (positive).
    pixel_size_um : float
        Detector pixel pitch in µm (55 for Medipix3 / Merlin).

    Returns
    -------
    float
        Angular sampling in mrad per pixel.
    """
    if not (np.isfinite(camera_length_mm) and camera_length_mm > 0):
        raise ValueError(f"camera_length_mm must be positive, got {camera_length_mm!r}")
    if not (np.isfinite(pixel_size_um) and pixel_size_um > 0):
        raise ValueError(f"pixel_size_um must be positive, got {pixel_size_um!r}")
    return float(pixel_size_um) / float(camera_length_mm)


def calibration_from_mapping(d: dict) -> Calibration:
    """Build a :class:`Calibration` from a sidecar mapping that may use experimental keys.

    Besides the dataclass fields it accepts ``camera_length_mm`` + ``pixel_size_um`` (instead of
    ``mrad_per_px``) and ``step_nm`` (instead of ``step_A``); the raw values are kept in
    ``extra``.

    Raises
    ------
    ValueError
        On unknown keys, on both ``mrad_per_px`` and a camera length, or on a camera length
        without a pixel size.
    """
    if not isinstance(d, dict):
        raise ValueError(f"a calibration must be a mapping, got {type(d).__name__}")
    d = dict(d)
    extra = dict(d.pop("extra", None) or {})
    cl = d.pop("camera_length_mm", None)
    px = d.pop("pixel_size_um", None)
    step_nm = d.pop("step_nm", None)
    if cl is not None or px is not None:
        if cl is None or px is None:
            raise ValueError("camera_length_mm and pixel_size_um must be given together")
        if "mrad_per_px" in d:
            raise ValueError(
                "give either mrad_per_px or camera_length_mm + pixel_size_um, not both"
            )
        for name, value in (("camera_length_mm", cl), ("pixel_size_um", px)):
            if not _is_number(value):
                raise ValueError(f"{name} must be a number, got {value!r}")
        d["mrad_per_px"] = mrad_per_px_from_camera_length(float(cl), float(px))
        extra.update(camera_length_mm=float(cl), pixel_size_um=float(px))
    if step_nm is not None:
        if "step_A" in d:
            raise ValueError("give either step_A or step_nm, not both")
        d["step_A"] = (_numbers(step_nm, "step_nm") * 10.0).tolist()
        extra["step_nm"] = step_nm
    d["extra"] = extra
    return Calibration.from_dict(d)


def sidecar_path(data_path: str | Path) -> Path | None:
    """Return the calibration sidecar of a data file if one exists, else ``None``.

    Looks for ``<file>.calibration.yaml`` (e.g. ``scan.mib.calibration.yaml``), then
    ``<stem>.calibration.yaml`` next to the file.
    """
    p = Path(data_path)
    for cand in (p.with_name(p.name + ".calibration.yaml"), p.with_suffix(".calibration.yaml")):
        if cand.is_file():
            return cand
    return None


def resolve_calibration(source: Calibration | dict | str | Path | None) -> Calibration | None:
    """Turn a Calibration, a mapping or a YAML path into a :class:`Calibration` (None → None)."""
    if source is None or isinstance(source, Calibration):
        return source
    if isinstance(source, dict):
        return calibration_from_mapping(source)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"calibration file {path} does not exist")
    d = read_yaml(path, what="calibration file")
    if d is None:
        d = {}  # an empty file: nothing calibrated (never defaulted)
    if not isinstance(d, dict):
        raise ValueError(f"{path}: a calibration file must hold a mapping, got "
                         f"{type(d).__name__}")
    try:
        return calibration_from_mapping(d)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def calibration_from_flags(
    *,
    base: Calibration | None = None,
    step_A: float | tuple[float, float] | None = None,
    mrad_per_px: float | tuple[float, float] | None = None,
    camera_length_mm: float | None = None,
    pixel_size_um: float | None = None,
    energy_keV: float | None = None,
    scan_rotation_deg: float | None = None,
) -> Calibration | None:
    """Override fields of ``base`` with command-line values (``None`` = keep).

    Returns ``None`` when there is neither a base nor any flag.
    """
    flags = dict(step_A=step_A, mrad_per_px=mrad_per_px, camera_length_mm=camera_length_mm,
                 pixel_size_um=pixel_size_um, energy_keV=energy_keV,
                 scan_rotation_deg=scan_rotation_deg)
    given = {k: v for k, v in flags.items() if v is not None}
    if base is None and not given:
        return None
    d = base.to_dict() if base is not None else {}
    if "camera_length_mm" in given or "pixel_size_um" in given:
        d.pop("mrad_per_px", None)
    d.update(given)
    return calibration_from_mapping(d)
