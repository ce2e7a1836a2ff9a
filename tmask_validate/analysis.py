"""One dataset in, every image and mask out: the analysis stage of the validation workflow.

:func:`analyse_dataset` takes one 4D-STEM dataset (one structure x thickness x dose, or one
experiment) and its atom-column site table and computes, with the streaming routines of
:mod:`tmask_validate.core` (every template of a kind goes through the same passes as a stack):

- virtual images (Eq. 2 on raw data): ``bf``, ``abf`` (11-23.5 mrad in the paper), ``adf`` and a
  sweep of ABF inner/outer radii (``abfsweep_i<inner>_o<outer>``); the sweep member with the best
  CNR of the lightest column type (inverted image) is copied to ``abf_best`` - the fairest ABF
  baseline;
- ``adf_pcc``: the PCC map of the virtual ADF image (Eq. 6, Fig. 2b) used as a mask (Eq. 7,
  Fig. SI1); ``adf_opt``: the Eq. 8 ("mean") map of the ADF image, threshold r > 0, applied to
  the raw data (Eq. 2, Fig. 2d);
- ``icom``: integrated centre of mass (atoms bright);
- ``eigen``: leading eigen-image of the correlation matrix C (Eq. 10), started from the ADF image;
- template masks and images ``tm_<norm>_<kind>_<label>`` for every site label and ``all``, every
  template kind (binary / disc / gaussian sigma sweep ``g0.35``) and both column normalisations
  (``pcc`` Eq. 4, ``mean`` Eq. 8);
- partial templates ``partial_<norm>_<kind>_<label>``: mask from a reference window of 1/9 of the
  scan (1/3 per direction), image from the whole scan (paper Sec. 3.2). For a periodic one-cell
  scan the window is 1/3 x 1/3 of the cell and may wrap across the cell edge, which is exactly a
  1/9 window of the 3 x 3 tiled scan; it is placed to hold at least one column of each type
  where possible (and, with a ``domain`` site column, one domain only);
- controls against template bias: ``ctl_random_<norm>_<kind>`` (random sites at least
  ``min_distance_A`` from every column), ``ctl_shift_<norm>_<kind>_<label>`` (the label's sites
  moved by the vector that keeps them furthest from every column), and split-half versions
  ``half_...`` whose masks come from the top half of the scan while their metrics are evaluated
  on the bottom half only (held-out data).

Everything is returned as one :class:`xarray.Dataset` (``masks`` (name, ky, kx), ``images``
(name, scan_y, scan_x), ``templates`` (name, scan_y, scan_x), per-name coordinates describing
each entry). :func:`dataset_metrics` turns it into a tidy metrics table with
:mod:`tmask_validate.metrics`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from tmask_validate import core, templates
from tmask_validate.calibration import Calibration

__all__ = [
    "Entry",
    "ScanSites",
    "entries",
    "analysis_options",
    "analyse_dataset",
    "dataset_metrics",
    "sites_from_dataset",
    "sites_to_variables",
    "lightest_label",
    "partial_window",
    "tiled_field",
    "control_sites",
    "ANALYSIS_VERSION",
]

#: bumped when the content of the analysis output changes meaning
ANALYSIS_VERSION = 1

#: atomic numbers of the elements our structures / experiments contain (composition parsing)
_Z = {
    "H": 1, "He": 2, "Li": 3, "Be": 4, "B": 5, "C": 6, "N": 7, "O": 8, "F": 9, "Na": 11,
    "Mg": 12, "Al": 13, "Si": 14, "P": 15, "S": 16, "Cl": 17, "K": 19, "Ca": 20, "Sc": 21,
    "Ti": 22, "V": 23, "Cr": 24, "Mn": 25, "Fe": 26, "Co": 27, "Ni": 28, "Cu": 29, "Zn": 30,
    "Ga": 31, "Ge": 32, "As": 33, "Se": 34, "Sr": 38, "Y": 39, "Zr": 40, "Nb": 41, "Mo": 42,
    "Ag": 47, "Sn": 50, "Ba": 56, "La": 57, "Ce": 58, "Hf": 72, "Ta": 73, "W": 74, "Pt": 78,
    "Au": 79, "Pb": 82, "Bi": 83,
}

#: per-name coordinates of the output Dataset, with their fill values
_NAME_COORDS = {
    "family": "",  # virtual | abf_sweep | abf_best | adf_pcc | adf_opt | icom | eigen | template
    #               | partial | partial_ref | control | half
    "label": "",  # target column label ("all", "Li", ...; "" = none; "fake" = control sites)
    "template_kind": "",  # binary | disc | gaussian | adf | ""
    "sigma_A": 0.0,
    "normalisation": "",  # pcc | mean | raw
    # scan region the mask was computed from: full | partial | top_half | partial_tiled (window
    # of a tiled multi-cell field) | tiled_full (the whole tiled field)
    "region": "full",
    "eval_region": "full",  # where metrics are evaluated: full | bottom_half
    "polarity": 1.0,  # multiply the image by this before metrics/display (-1: inverted BF/ABF)
    "inner_mrad": 0.0,
    "outer_mrad": 0.0,
    "has_mask": True,
    # name of the entry this one is compared with (partial / split-half masks and templates vs
    # the full-scan entry of the same template; eigen vs adf); "" = none
    "reference": "",
    "control": "",  # wrong-site control: "random" | "shift" | ""
    "control_of": "",  # label whose sites a "shift" control moved
}


@dataclass(frozen=True)
class Entry:
    """One analysis entry (image, mask, template) described by typed fields, so that no module
    has to read meaning out of its ``name``. Read them back with :func:`entries`."""

    name: str
    family: str
    label: str = ""
    template_kind: str = ""
    sigma_A: float = 0.0
    normalisation: str = ""
    region: str = "full"
    eval_region: str = "full"
    polarity: float = 1.0
    inner_mrad: float = 0.0
    outer_mrad: float = 0.0
    has_mask: bool = True
    reference: str = ""
    control: str = ""
    control_of: str = ""

    @property
    def control_key(self) -> str:
        """Key of the control site table (:func:`control_tables`) of a control entry."""
        return "random" if self.control == "random" else f"shift_{self.control_of}"


def entries(ads: xr.Dataset) -> list[Entry]:
    """The :class:`Entry` of every ``name`` of an analysed dataset (older files: missing
    fields take their defaults)."""
    names = [str(n) for n in ads["name"].values]
    cols = {k: (ads[k].values if k in ads.coords else None) for k in _NAME_COORDS}
    out = []
    for i, name in enumerate(names):
        kw = {}
        for k, fill in _NAME_COORDS.items():
            v = cols[k][i].item() if cols[k] is not None else fill
            kw[k] = type(fill)(v) if not isinstance(fill, bool) else bool(v)
        if cols["reference"] is None:  # written before the entry fields existed
            kw.update(_legacy_fields(name, kw["family"], set(names)))
        out.append(Entry(name=name, **kw))
    return out


def _legacy_fields(name: str, family: str, names: set[str]) -> dict[str, str]:
    """reference / control fields of an entry of an analysis file written before they were
    stored (the naming rules of that version; only used to read such files)."""
    out: dict[str, str] = {}
    if family in ("control", "half_control"):
        if "_random_" in name:
            out.update(control="random")
        else:
            out.update(control="shift", control_of=name.rsplit("_", 1)[-1])
    if family == "half":
        out["reference"] = "tm_" + name[len("half_"):]
    elif family == "half_control":
        out["reference"] = name[len("half_"):]
    elif family == "partial":
        rest = name[len("partial_"):]
        out["reference"] = ("partialref_" + rest) if "partialref_" + rest in names else (
            "tm_" + rest)
    elif family == "eigen":
        out["reference"] = "adf"
    return out


# ----------------------------------------------------------------------------------------------
# options
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class ScanSites:
    """A site table validated once, carried with the scan geometry it is expressed in (Å;
    pixel ``[0, 0]`` at ``origin_A``). Build it with :meth:`of`; helpers take it instead of
    ``sites, scan_shape, step_A=..., origin_A=..., periodic=...``."""

    sites: pd.DataFrame
    scan_shape: tuple[int, int]
    step_A: tuple[float, float]
    origin_A: tuple[float, float] = (0.0, 0.0)
    periodic: bool = False

    @classmethod
    def of(cls, sites: pd.DataFrame, scan_shape: Sequence[int], *, step_A,
           origin_A=(0.0, 0.0), periodic: bool = False) -> ScanSites:
        """Validate ``sites`` (:func:`tmask_validate.templates.validate_sites`) and the
        geometry once."""
        sy, sx = (int(v) for v in scan_shape)
        return cls(templates.validate_sites(sites), (sy, sx),
                   templates.as_pair(step_A, "step_A"),
                   templates.as_pair(origin_A, "origin_A", positive=False), bool(periodic))

    @property
    def geometry(self) -> dict[str, Any]:
        """``step_A``, ``origin_A``, ``periodic`` as keywords for templates / metrics."""
        return {"step_A": self.step_A, "origin_A": self.origin_A, "periodic": self.periodic}

    @functools.cached_property
    def yx_px(self) -> np.ndarray:
        """Sub-pixel site positions ``(n, 2)`` (``templates.sites_to_pixels``)."""
        return templates.sites_to_pixels(self.sites, self.step_A, self.origin_A)

    def with_periodic(self, periodic: bool) -> ScanSites:
        return dataclasses.replace(self, periodic=bool(periodic))


def analysis_options(overrides: Mapping[str, Any] | None = None) -> dict:
    """Analysis options: the ``analysis`` config section with every default filled in.

    Parameters
    ----------
    overrides : mapping, optional
        A (partial) ``analysis`` section; validated against
        ``tmask_validate/schemas/analysis.schema.yaml``.

    Returns
    -------
    dict
        The complete section.

    Raises
    ------
    ValueError
        If ``overrides`` violates the schema.
    """
    from tmask_validate.config import validate_config

    cfg = validate_config({"name": "analysis", "seed": 0, "analysis": dict(overrides or {})})
    return cfg["analysis"]


# ----------------------------------------------------------------------------------------------
# site tables
# ----------------------------------------------------------------------------------------------
def sites_from_dataset(ds: xr.Dataset) -> pd.DataFrame:
    """Site table stored as ``site_*`` variables on dim ``site`` (simulation store layout)."""
    if "site_label" not in ds:
        raise ValueError("dataset has no site table (variables site_label, site_y_A, site_x_A)")
    out = {}
    for var in ds.data_vars:
        if str(var).startswith("site_") and ds[var].dims == ("site",):
            out[str(var)[5:]] = ds[var].values
    df = pd.DataFrame(out)
    df["label"] = df["label"].astype(str)
    return df


def sites_to_variables(sites: pd.DataFrame) -> dict[str, xr.DataArray]:
    """Inverse of :func:`sites_from_dataset`: ``site_<column>`` variables on dim ``site``."""
    out = {}
    for col in sites.columns:
        vals = sites[col].to_numpy()
        if vals.dtype == object:
            vals = vals.astype(str)
        out[f"site_{col}"] = xr.DataArray(vals, dims=("site",))
    return out


def _composition_z(composition: str, label: str) -> int:
    """Largest atomic number in a composition string such as ``"P1O1"`` (else in the label)."""
    for text in (composition, label):
        els = [e for e in re.findall(r"[A-Z][a-z]?", str(text)) if e in _Z]
        if els:
            return max(_Z[e] for e in els)
    return 10**6


def lightest_label(sites: pd.DataFrame) -> str:
    """Label of the column type whose heaviest element is lightest (Li in LiFePO4, O in PbTiO3).

    Uses the ``composition`` column when present, otherwise element symbols in the label.
    """
    s = templates.validate_sites(sites)
    comps = s["composition"] if "composition" in s else s["label"]
    best, best_z = None, None
    for lab, comp in zip(s["label"], comps, strict=True):
        z = _composition_z(str(comp), lab)
        if best_z is None or z < best_z:
            best, best_z = lab, z
    return str(best)


# ----------------------------------------------------------------------------------------------
# geometry helpers
# ----------------------------------------------------------------------------------------------
def _count_in_region(yx_px: np.ndarray, region: np.ndarray, periodic: bool) -> np.ndarray:
    """Per-site flag: nearest pixel inside ``region``."""
    sy, sx = region.shape
    idx = np.floor(yx_px + 0.5).astype(np.int64)
    if periodic:
        idx = np.mod(idx, (sy, sx))
        ok = np.ones(len(idx), bool)
    else:
        ok = (idx[:, 0] >= 0) & (idx[:, 0] < sy) & (idx[:, 1] >= 0) & (idx[:, 1] < sx)
    inside = np.zeros(len(idx), bool)
    inside[ok] = region[idx[ok, 0], idx[ok, 1]]
    return inside


def partial_window(
    sites: pd.DataFrame,
    scan_shape: tuple[int, int],
    *,
    step_A,
    origin_A=(0.0, 0.0),
    fraction: float = 1.0 / 3.0,
    periodic: bool = False,
) -> np.ndarray:
    """Boolean reference window (``fraction`` of the scan per direction) for partial templates.

    The window is placed (wrapping across the edges when ``periodic``) to maximise the smallest
    number of columns of any type inside it; with a ``domain`` column in ``sites`` windows that
    hold a single domain are preferred; ties go to the window nearest the scan centre.

    Returns
    -------
    numpy.ndarray of bool, shape ``scan_shape``
    """
    return _partial_window(ScanSites.of(sites, scan_shape, step_A=step_A, origin_A=origin_A,
                                        periodic=periodic), fraction)


def _partial_window(scan: ScanSites, fraction: float) -> np.ndarray:
    sy, sx = scan.scan_shape
    periodic = scan.periodic
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    wy, wx = max(1, round(sy * fraction)), max(1, round(sx * fraction))
    s = scan.sites
    yx = scan.yx_px
    labels = s["label"].to_numpy()
    uniq = list(dict.fromkeys(labels))
    domains = s["domain"].to_numpy() if "domain" in s else None
    oy_range = range(sy) if periodic else range(sy - wy + 1)
    ox_range = range(sx) if periodic else range(sx - wx + 1)
    best_key, best = None, None
    for oy in oy_range:
        for ox in ox_range:
            reg = np.zeros((sy, sx), bool)
            rows = np.arange(oy, oy + wy) % sy
            cols = np.arange(ox, ox + wx) % sx
            reg[np.ix_(rows, cols)] = True
            inside = _count_in_region(yx, reg, periodic)
            counts = [int(np.sum(inside & (labels == lab))) for lab in uniq]
            single = 1
            if domains is not None and inside.any():
                single = int(len(set(domains[inside].tolist())) == 1)
            dist = -((oy + wy / 2 - sy / 2) ** 2 + (ox + wx / 2 - sx / 2) ** 2)
            key = (single, min(counts), sum(counts), dist)
            if best_key is None or key > best_key:
                best_key, best = key, reg
    return best


def _min_dist_A(points_A: np.ndarray, sites_yx_A: np.ndarray, period_A) -> np.ndarray:
    """Distance (Å) from each point to the nearest site (minimum image when periodic)."""
    from scipy.spatial import cKDTree

    pts = np.asarray(points_A, float).reshape(-1, 2)
    ref = np.asarray(sites_yx_A, float).reshape(-1, 2)
    if period_A is not None:
        per = np.asarray(period_A, float)

        def wrap(x):
            x = np.mod(x, per)
            return np.where(x >= per, 0.0, x)  # np.mod(-tiny, L) can round to L

        d, _ = cKDTree(wrap(ref), boxsize=per).query(wrap(pts))
    else:
        d, _ = cKDTree(ref).query(pts)
    return np.asarray(d, float)


def control_sites(
    sites: pd.DataFrame,
    scan_shape: tuple[int, int],
    *,
    step_A,
    origin_A=(0.0, 0.0),
    periodic: bool = False,
    n_random: int | None = None,
    min_distance_A: float = 0.7,
    seed: int = 0,
) -> dict[str, pd.DataFrame]:
    """Wrong-site control site tables, all labelled ``"fake"``.

    Returns ``{"random": ..., "shift_<label>": ...}``: ``random`` holds ``n_random`` positions
    (default: as many as the most numerous column type) drawn uniformly on scan pixels that are
    at least ``min_distance_A`` from every real column (the threshold is lowered in steps when
    too few pixels qualify); ``shift_<label>`` is the label's sites moved by the shift vector (on
    a 1/20-cell grid) that maximises their smallest distance from every real column.
    """
    return _control_sites(ScanSites.of(sites, scan_shape, step_A=step_A, origin_A=origin_A,
                                       periodic=periodic), n_random=n_random,
                          min_distance_A=min_distance_A, seed=seed)


def _control_sites(scan: ScanSites, *, n_random: int | None, min_distance_A: float,
                   seed: int) -> dict[str, pd.DataFrame]:
    s = scan.sites
    sy, sx = scan.scan_shape
    periodic = scan.periodic
    step = np.asarray(scan.step_A)
    origin = np.asarray(scan.origin_A)
    period = step * (sy, sx) if periodic else None
    real = s[["y_A", "x_A"]].to_numpy(float)
    rng = np.random.default_rng(seed)
    py, px = np.mgrid[0:sy, 0:sx]
    pix_A = np.stack([py.ravel(), px.ravel()], 1) * step + origin
    dmin = _min_dist_A(pix_A, real, period)
    counts = s["label"].value_counts()
    n = int(n_random or counts.max())
    thr = float(min_distance_A)
    allowed = np.flatnonzero(dmin >= thr)
    while allowed.size < n and thr > 0:
        thr *= 0.8
        allowed = np.flatnonzero(dmin >= thr) if thr > 1e-3 else np.arange(dmin.size)
    n = min(n, allowed.size)
    pick = rng.choice(allowed, size=n, replace=False)
    out = {"random": pd.DataFrame({"label": "fake", "y_A": pix_A[pick, 0], "x_A": pix_A[pick, 1]})}
    extent = step * (sy, sx)
    grid = np.stack(np.meshgrid(np.linspace(0, 1, 20, endpoint=False),
                                np.linspace(0, 1, 20, endpoint=False), indexing="ij"), -1)
    shifts = grid.reshape(-1, 2)[1:] * extent
    for lab in dict.fromkeys(s["label"]):
        own = real[(s["label"] == lab).to_numpy()]
        best_shift, best_d = None, -1.0
        for sh in shifts:
            moved = own + sh
            if not periodic:
                inside = np.all((moved >= origin) & (moved < origin + extent), axis=1)
                if inside.sum() < max(1, len(own) // 2):
                    continue
                moved = moved[inside]
            d = _min_dist_A(moved, real, period).min()
            if d > best_d + 1e-9:
                best_shift, best_d = sh, d
        if best_shift is None:
            continue
        moved = own + best_shift
        if not periodic:
            moved = moved[np.all((moved >= origin) & (moved < origin + extent), axis=1)]
        out[f"shift_{lab}"] = pd.DataFrame({"label": "fake", "y_A": moved[:, 0],
                                            "x_A": moved[:, 1]})
    return out


# ----------------------------------------------------------------------------------------------
# the analysis
# ----------------------------------------------------------------------------------------------
class _Collector:
    """Accumulates named masks/images/templates with their descriptive coordinates."""

    def __init__(self, det_shape, scan_shape):
        self.det_shape, self.scan_shape = tuple(det_shape), tuple(scan_shape)
        self.names: list[str] = []
        self.masks: list[np.ndarray] = []
        self.images: list[np.ndarray] = []
        self.tmpls: list[np.ndarray] = []
        self.coords: dict[str, list] = {k: [] for k in _NAME_COORDS}

    def add(self, name, image, mask=None, template=None, **coords):
        if name in self.names:
            raise ValueError(f"duplicate analysis entry {name!r}")
        image = np.asarray(image, dtype=np.float64)
        if image.shape != self.scan_shape:
            raise ValueError(f"{name}: image shape {image.shape} != scan shape {self.scan_shape}")
        image = np.nan_to_num(image, nan=0.0, posinf=0.0, neginf=0.0)
        has_mask = mask is not None
        mask = np.zeros(self.det_shape) if mask is None else np.asarray(mask, dtype=np.float64)
        template = np.zeros(self.scan_shape) if template is None else np.asarray(template, float)
        self.names.append(name)
        self.images.append(image.astype(np.float32))
        self.masks.append(np.nan_to_num(mask).astype(np.float32))
        self.tmpls.append(template.astype(np.float32))
        coords.setdefault("has_mask", has_mask)
        unknown = set(coords) - set(_NAME_COORDS)
        if unknown:
            raise ValueError(f"unknown coords {unknown}")
        for key, fill in _NAME_COORDS.items():
            self.coords[key].append(coords.get(key, fill))


def _center_px(calibration: Calibration, mean_pattern: np.ndarray) -> tuple[float, float]:
    if calibration.center_px is not None:
        return tuple(calibration.center_px)
    w = np.clip(mean_pattern, 0, None)
    tot = w.sum()
    if tot <= 0:
        return ((w.shape[0] - 1) / 2, (w.shape[1] - 1) / 2)
    iy, ix = np.indices(w.shape)
    return (float((iy * w).sum() / tot), float((ix * w).sum() / tot))


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, float).ravel() - np.mean(a)
    b = np.asarray(b, float).ravel() - np.mean(b)
    den = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else 0.0


def _sigma_tag(sigma: float) -> str:
    return f"g{sigma:.2f}".rstrip("0").rstrip(".")


def tiled_field(
    one_cell: Any,
    sites: pd.DataFrame,
    *,
    cell_A: Sequence[float],
    cells: Sequence[int] = (3, 3),
    electrons_per_probe: float | None = None,
    seed: int = 0,
    rows_per_block: int = 16,
) -> tuple[np.ndarray, pd.DataFrame]:
    """A multi-cell field of view tiled from one-cell periodic data (partial templates).

    Parameters
    ----------
    one_cell : array_like (sy, sx, ky, kx)
        One projected cell on a periodic probe grid. With ``electrons_per_probe`` these must be
        the noiseless intensities (fractions of the probe intensity).
    sites : DataFrame
        Site table of the one-cell scan (Å, scan frame).
    cell_A : (Ly, Lx)
        Projected cell [Å] (the one-cell scan covers exactly this).
    cells : (cy, cx)
        Field of view in cells.
    electrons_per_probe : float, optional
        None: the field is the exact tiling (float32). Otherwise INDEPENDENT Poisson counts
        (uint32) with expectation ``intensity * electrons_per_probe`` at every probe position.
    seed : int
        Seed of the Poisson noise (one stream per block of scan rows).

    Returns
    -------
    field : ndarray (cy*sy, cx*sx, ky, kx)
    field_sites : DataFrame
        The site table repeated in every cell.
    """
    src = np.asarray(one_cell)
    if src.ndim != 4:
        raise ValueError(f"one_cell must be (sy, sx, ky, kx), got shape {src.shape}")
    cy, cx = (int(v) for v in cells)
    if cy < 1 or cx < 1:
        raise ValueError(f"cells must be >= 1, got {tuple(cells)}")
    ly, lx = (float(v) for v in cell_A)
    sy, sx = src.shape[:2]
    s = templates.validate_sites(sites)
    reps = [s.assign(y_A=s["y_A"] + i * ly, x_A=s["x_A"] + j * lx)
            for i in range(cy) for j in range(cx)]
    field_sites = pd.concat(reps, ignore_index=True)
    if electrons_per_probe is None:
        return np.tile(src.astype(np.float32, copy=False), (cy, cx, 1, 1)), field_sites
    if not (np.isfinite(electrons_per_probe) and electrons_per_probe > 0):
        raise ValueError(f"electrons_per_probe must be finite and > 0, got {electrons_per_probe}")
    lam_cell = np.clip(src.astype(np.float64), 0.0, None) * float(electrons_per_probe)
    out = np.empty((cy * sy, cx * sx, *src.shape[2:]), np.uint32)
    for r0 in range(0, cy * sy, rows_per_block):
        r1 = min(r0 + rows_per_block, cy * sy)
        rows = np.arange(r0, r1) % sy
        lam = np.tile(lam_cell[rows], (1, cx, 1, 1))
        rng = np.random.default_rng([int(seed), 7919, r0])
        out[r0:r1] = rng.poisson(lam)
    return out, field_sites


def _covers_one_cell(scan_shape, step_A, cell_A) -> bool:
    if cell_A is None:
        return False
    return all(abs(n * st - c) <= 1e-3 * c for n, st, c in zip(scan_shape, step_A, cell_A,
                                                                  strict=True))


def _template_sets(scan: ScanSites, *, opts, region=None, kinds=None, sigmas=None):
    """``[(kind_tag, kind, sigma_A, {label: template})]`` for the configured template kinds."""
    topt = opts["templates"]
    kinds = list(kinds or topt["kinds"])
    sigmas = list(sigmas if sigmas is not None else topt["gaussian_sigma_A"])
    out = []
    common = dict(**scan.geometry, region=region)
    for kind in kinds:
        if kind == "gaussian":
            for sig in sigmas:
                out.append((_sigma_tag(sig), "gaussian", float(sig),
                            _safe_templates(scan, kind="gaussian", sigma_A=sig, **common)))
        elif kind == "disc":
            out.append(("disc", "disc", 0.0,
                        _safe_templates(scan, kind="disc", radius_A=topt["disc_radius_A"],
                                        **common)))
        else:
            out.append(("binary", "binary", 0.0,
                        _safe_templates(scan, kind="binary", **common)))
    return out


def _safe_templates(scan: ScanSites, **kw) -> dict[str, np.ndarray]:
    """species_templates, one label at a time, skipping labels that give no usable template."""
    s, scan_shape = scan.sites, scan.scan_shape
    out = {}
    labels = list(dict.fromkeys(s["label"]))
    for lab in labels + ["all"]:
        try:
            if lab == "all":
                t = templates.species_templates(s, scan_shape, labels=[], include_all=True, **kw)
                out["all"] = t["all"]
            else:
                t = templates.species_templates(s, scan_shape, labels=[lab], include_all=False,
                                                **kw)
                out[lab] = t[lab]
        except ValueError as exc:
            warnings.warn(f"template {lab!r} skipped: {exc}", stacklevel=3)
    return out


def _control_templates(ctl_sites, scan: ScanSites, *, kind, sigma_A, radius_A,
                       region=None) -> dict[str, np.ndarray]:
    out = {}
    step = scan.step_A
    for key, tab in ctl_sites.items():
        if len(tab) == 0:
            continue
        try:
            yx = templates.sites_to_pixels(tab, step, scan.origin_A)
            out[key] = templates.make_template(
                yx, scan.scan_shape, kind=kind, periodic=scan.periodic, region=region,
                sigma_px=None if sigma_A is None else (sigma_A / step[0], sigma_A / step[1]),
                radius_px=None if radius_A is None else (radius_A / step[0], radius_A / step[1]),
            )
        except ValueError as exc:
            warnings.warn(f"control template {key!r} skipped: {exc}", stacklevel=2)
    return out


def _control_fields(key: str) -> dict[str, str]:
    """Entry fields of the control built from control site table ``key`` ("random",
    "shift_<label>"; the keys :func:`control_sites` returns)."""
    if key == "random":
        return {"control": "random", "control_of": ""}
    return {"control": "shift", "control_of": key[len("shift_"):]}


def _stack(named: Sequence[tuple[str, np.ndarray]]) -> np.ndarray:
    return np.stack([np.asarray(t, np.float64) for _, t in named], axis=0)


def analyse_dataset(
    data: Any,
    sites: pd.DataFrame,
    calibration: Calibration,
    *,
    cell_A: Sequence[float] | None = None,
    periodic: bool = False,
    options: Mapping[str, Any] | None = None,
    origin_A: Sequence[float] = (0.0, 0.0),
    meta: Mapping[str, Any] | None = None,
    partial_region: np.ndarray | None = None,
    noiseless: Any = None,
) -> xr.Dataset:
    """Every image and mask of the validation for one 4D dataset.

    Parameters
    ----------
    data : array_like, shape (scan_y, scan_x, ky, kx)
        numpy / memmap / zarr / dask; streamed by :mod:`tmask_validate.core`.
    sites : pandas.DataFrame
        Site table (``label``, ``y_A``, ``x_A``, optional ``composition``, ``n_atoms``,
        ``domain``) in the scan frame (Å; pixel ``[0, 0]`` at ``origin_A``).
    calibration : Calibration
        Scan step, detector sampling and centre (``center_px=None``: centroid of the mean
        pattern).
    cell_A : (float, float), optional
        Projected cell ``(Ly, Lx)`` in Å (stored; used for unit-cell averages).
    periodic : bool
        The scan covers whole projected cells (images are periodic).
    options : mapping, optional
        ``analysis`` config section (see :func:`analysis_options`).
    origin_A : (float, float)
        Scan position (Å) of pixel ``[0, 0]``.
    meta : mapping, optional
        Extra JSON-able attributes (structure, thickness_nm, dose_key, ...).
    partial_region : bool array (scan_y, scan_x), optional
        Reference region of the partial templates (default: chosen by :func:`partial_window`).
        Not used for periodic one-cell scans evaluated on a tiled field (see below).
    noiseless : array_like (scan_y, scan_x, ky, kx), optional
        The noiseless intensities behind noisy periodic data (``meta['dose_e_per_A2']`` set):
        the tiled field of the partial templates gets independent Poisson noise from them.

    Partial templates of periodic one-cell scans (``periodic`` and the scan is one cell): a
    1/9 window of ONE cell would test a mask from a fraction of a unit cell, not the paper's
    claim (its window held many cells). With ``partial.tile_cells`` set, a field of that many
    cells is tiled from the data (:func:`tiled_field`; independent Poisson noise at the
    dataset's dose when it is noisy), the partial mask comes from a window of ``fraction`` of
    the field per direction, offset by ``partial.window_offset_cells`` from the cell origin,
    and the reference (``partialref_*``) is the mask of the whole field; both are applied to
    the original scan for the images. For noiseless data the window holds exactly one cell,
    so the two masks agree by periodicity (the comparison is not informative).

    Returns
    -------
    xarray.Dataset
        ``masks`` (name, ky, kx), ``images`` (name, scan_y, scan_x), ``templates`` (name, scan_y,
        scan_x) with per-name coordinates (``family``, ``label``, ``template_kind``, ``sigma_A``,
        ``normalisation``, ``region``, ``eval_region``, ``polarity``, ``inner_mrad``,
        ``outer_mrad``, ``has_mask``), regions, mean pattern, scattering angles, the sorted D
        matrix (Fig. 1c), the site table (``site_*``) and attrs (calibration JSON, options JSON,
        cell_A, periodic, best ABF radii, eigenvalue, ...).

    Raises
    ------
    ValueError
        Bad data shape, empty site table, or detectors entirely outside the recorded angles.
    """
    opts = analysis_options(options)
    if not isinstance(calibration, Calibration):
        raise ValueError(f"calibration must be a Calibration, got {type(calibration).__name__}")
    shape = tuple(int(v) for v in data.shape)
    if len(shape) != 4:
        raise ValueError(f"data must be 4D [scan_y, scan_x, ky, kx], got shape {shape}")
    scan_shape, det_shape = shape[:2], shape[2:]
    step_A = calibration.step_A
    origin_A = tuple(float(v) for v in origin_A)
    # the site table is validated once and carried with its scan geometry from here on
    scan = ScanSites.of(sites, scan_shape, step_A=step_A, origin_A=origin_A, periodic=periodic)
    sites = scan.sites
    notes: list[str] = []

    # ---- pass: column statistics (shared by every normalised image) ----
    stats = core.column_stats(data)
    mean_pattern = np.asarray(stats.mean, np.float64)
    center_px = _center_px(calibration, mean_pattern)
    # detector pixels with a real signal (see analysis.schema: min_relative_mean)
    peak = float(np.max(mean_pattern)) if mean_pattern.size else 0.0
    valid = mean_pattern > opts["min_relative_mean"] * peak if peak > 0 else mean_pattern > 0
    n_invalid = int(valid.size - valid.sum())
    if n_invalid:
        notes.append(f"{n_invalid} detector pixels below {opts['min_relative_mean']:g} of the "
                     "peak mean intensity left out of the PCC masks")
    # Eq. 8 weights a column by 1/mean^2: its own, higher floor (analysis.schema)
    valid_eq8 = valid & (mean_pattern >= opts["eq8_min_relative_mean"] * peak)
    n_eq8 = int(valid.sum() - valid_eq8.sum())
    if n_eq8:
        notes.append(f"{n_eq8} more detector pixels below {opts['eq8_min_relative_mean']:g} of "
                     "the peak mean intensity left out of the Eq. 8 (mean) masks")
    valids = {"pcc": valid, "mean": valid_eq8}
    angle = np.asarray(core.scattering_angle_mrad(det_shape, center_px=center_px,
                                                  mrad_per_px=calibration.mrad_per_px))
    max_angle = float(angle.max())
    col = _Collector(det_shape, scan_shape)

    # ---- virtual detectors (one pass for all, incl. the ABF sweep) ----
    dets: dict[str, tuple[float, float]] = {}
    for name, (inner, outer) in opts["detectors_mrad"].items():
        outer_c = min(float(outer), max_angle)
        if inner >= outer_c:
            raise ValueError(f"virtual detector {name!r} ({inner}-{outer} mrad) lies outside the "
                             f"recorded angles (max {max_angle:.1f} mrad)")
        if outer_c < outer:
            notes.append(f"{name}: outer radius clipped to {outer_c:.1f} mrad")
        dets[name] = (float(inner), outer_c)
    sweep = {}
    for inner in opts["abf_sweep"]["inner_mrad"]:
        for outer in opts["abf_sweep"]["outer_mrad"]:
            outer_c = min(float(outer), max_angle)
            if inner < outer_c and outer_c == float(outer):
                sweep[f"abfsweep_i{inner:g}_o{outer:g}"] = (float(inner), float(outer))
    all_dets = {**dets, **sweep}
    det_masks = core.virtual_detector_masks(det_shape, all_dets, center_px=center_px,
                                            mrad_per_px=calibration.mrad_per_px)
    det_masks = {k: v for k, v in det_masks.items() if np.any(v)}
    vimgs = core.virtual_images(data, det_masks)
    for name in dets:
        if name not in vimgs:
            raise ValueError(f"virtual detector {name!r} covers no detector pixel")
        col.add(name, vimgs[name], det_masks[name], family="virtual", normalisation="raw",
                polarity=-1.0 if name in ("bf", "abf") else 1.0,
                inner_mrad=dets[name][0], outer_mrad=dets[name][1])
    for name in sweep:
        if name in vimgs:
            col.add(name, vimgs[name], det_masks[name], family="abf_sweep", normalisation="raw",
                    polarity=-1.0, inner_mrad=sweep[name][0], outer_mrad=sweep[name][1])
    adf = np.asarray(vimgs["adf"], np.float64)

    # best ABF by CNR of the lightest (or chosen) column type, inverted image
    target = opts["abf_sweep"]["target_label"] or lightest_label(sites)
    best_name, best_cnr = "abf", -np.inf
    radius_A = opts["metrics"]["radius_A"]
    for name in ["abf", *[n for n in sweep if n in vimgs]]:
        c = _cnr(-np.asarray(vimgs[name], float), scan, target, radius_A=radius_A)
        if c > best_cnr:
            best_name, best_cnr = name, c
    inner, outer = all_dets[best_name]
    col.add("abf_best", vimgs[best_name], det_masks[best_name], family="abf_best",
            normalisation="raw", polarity=-1.0, inner_mrad=inner, outer_mrad=outer, label=target)

    # ---- iCoM ----
    icom = core.integrated_center_of_mass(
        data, step_A=step_A, center_px=center_px, mrad_per_px=calibration.mrad_per_px,
        rotation_deg=calibration.scan_rotation_deg, pad=None if periodic else "mirror",
        highpass=float(opts["icom"]["highpass"]))
    col.add("icom", icom, None, family="icom", normalisation="raw")

    # ---- optimised ADF (Eq. 8 map of the ADF image, r > 0, raw data) ----
    r_mean = np.asarray(core.pcc_mask(data, adf, normalisation="mean", valid=valids["mean"]),
                        np.float64)
    r_thr = np.where(r_mean > 0, r_mean, 0.0)
    adf_opt = core.apply_mask(data, r_thr, normalised=False)
    col.add("adf_opt", adf_opt, r_thr, template=adf, family="adf_opt", template_kind="adf",
            normalisation="mean")

    # ---- eigen-image of C, started from the ADF image ----
    eig_img, eig_mask, eig_val = core.eigen_image(
        data, init=adf, normalisation="pcc", n_iter=opts["eigen"]["n_iter"],
        tol=opts["eigen"]["tol"], valid=valid)
    eig_img, eig_mask = np.asarray(eig_img, float), np.asarray(eig_mask, float)
    if _pearson(eig_img, adf) < 0:
        eig_img, eig_mask = -eig_img, -eig_mask
    col.add("eigen", eig_img, eig_mask, family="eigen", normalisation="pcc", reference="adf")

    # ---- template stacks: full-scan templates (+ ADF image + controls) ----
    tsets = _template_sets(scan, opts=opts)
    sig_list = opts["templates"]["gaussian_sigma_A"]
    ref_sigma = opts["templates"]["reference_sigma_A"]
    if ref_sigma is None:
        ref_sigma = float(sorted(sig_list)[len(sig_list) // 2]) if sig_list else 0.35
    ref_kinds = [("binary", "binary", None), (_sigma_tag(ref_sigma), "gaussian", ref_sigma)]
    full: list[tuple[str, np.ndarray, dict]] = []
    full.append(("adf_pcc", adf, dict(family="adf_pcc", template_kind="adf")))
    for tag, kind, sig, tdict in tsets:
        for lab, t in tdict.items():
            full.append((f"{{norm}}_{tag}_{lab}", t,
                         dict(family="template", label=lab, template_kind=kind, sigma_A=sig)))
    copt = opts["controls"]
    ctl = {}
    if copt["enabled"]:
        ctl = _control_sites(scan, n_random=copt["n_random"],
                             min_distance_A=copt["min_distance_A"], seed=copt["seed"])
        for tag, kind, sig in ref_kinds:
            ct = _control_templates(ctl, scan, kind=kind, sigma_A=sig, radius_A=None)
            for key, t in ct.items():
                full.append((f"ctl_{key.split('_')[0]}_{{norm}}_{tag}"
                             + (f"_{key[6:]}" if key.startswith("shift_") else ""), t,
                             dict(family="control", label="fake", template_kind=kind,
                                  sigma_A=sig or 0.0, **_control_fields(key))))
    _run_stack(data, stats, col, full, opts, region_name="full", region=None, valids=valids)

    # ---- partial templates (mask from a 1/9 window, image everywhere) ----
    regions = {}
    popt = opts["partial"]
    tiled = (popt["enabled"] and popt["tile_cells"] is not None and periodic
             and partial_region is None and _covers_one_cell(scan_shape, step_A, cell_A))
    dose = (meta or {}).get("dose_e_per_A2")
    if tiled and dose is not None and noiseless is None:
        notes.append("partial: noisy periodic data without its noiseless source - independent "
                     "noise on a tiled field is impossible; 1/9 window of the one-cell scan used")
        tiled = False
    if tiled:
        _partial_tiled(data, stats, col, scan, opts, valids=valids, cell_A=cell_A,
                       ref_sigma=ref_sigma, noiseless=noiseless, dose=dose, notes=notes)
    elif popt["enabled"]:
        if partial_region is not None:
            reg = templates.check_region(partial_region, scan_shape)
        else:
            reg = _partial_window(scan, popt["fraction"])
        regions["partial"] = reg
        part = []
        for tag, kind, sig, tdict in _template_sets(
                scan, opts=opts, region=reg, kinds=["binary", "gaussian"], sigmas=[ref_sigma]):
            for lab, t in tdict.items():
                part.append((f"partial_{{norm}}_{tag}_{lab}", t,
                             dict(family="partial", label=lab, template_kind=kind,
                                  sigma_A=sig, reference=f"tm_{{norm}}_{tag}_{lab}")))
        _run_stack(data, stats, col, part, opts, region_name="partial", region=reg, valids=valids)

    # ---- split-half: masks from the top half, metrics on the bottom half ----
    if copt["enabled"] and scan_shape[0] >= 4:
        top = np.zeros(scan_shape, bool)
        top[: scan_shape[0] // 2] = True
        regions["top_half"] = top
        half = []
        for tag, kind, sig, tdict in _template_sets(
                scan, opts=opts, region=top, kinds=["binary", "gaussian"], sigmas=[ref_sigma]):
            for lab, t in tdict.items():
                half.append((f"half_{{norm}}_{tag}_{lab}", t,
                             dict(family="half", label=lab, template_kind=kind, sigma_A=sig,
                                  eval_region="bottom_half",
                                  reference=f"tm_{{norm}}_{tag}_{lab}")))
        for tag, kind, sig in ref_kinds:
            ct = _control_templates(ctl, scan, kind=kind, sigma_A=sig, radius_A=None,
                                    region=top)
            for key, t in ct.items():
                ref = (f"ctl_{key.split('_')[0]}_{{norm}}_{tag}"
                       + (f"_{key[6:]}" if key.startswith("shift_") else ""))
                half.append(("half_" + ref, t,
                             dict(family="half_control", label="fake", template_kind=kind,
                                  sigma_A=sig or 0.0, eval_region="bottom_half",
                                  reference=ref, **_control_fields(key))))
        _run_stack(data, stats, col, half, opts, region_name="top_half", region=top,
                   valids=valids)

    # ---- Fig. 1c sorted D matrix ----
    dmat, dcol_angle = core.sorted_d_matrix(
        data, center_px=center_px, mrad_per_px=calibration.mrad_per_px,
        high_angle_mrad=dets["adf"][0], max_rows=512, max_cols=opts["dmatrix"]["max_columns"])
    dmat = np.asarray(dmat, np.float32)
    dcol_angle = np.asarray(dcol_angle, np.float64)

    return _to_dataset(
        col, data_shape=shape, calibration=calibration, center_px=center_px, angle=angle,
        mean_pattern=mean_pattern, regions=regions, sites=sites, ctl=ctl, dmat=dmat, valid=valid,
        dcol_angle=dcol_angle, opts=opts, cell_A=cell_A, periodic=periodic, origin_A=origin_A,
        meta=dict(meta or {}), notes=notes,
        extra_attrs={"abf_best_from": best_name, "abf_best_target": target,
                     "abf_best_cnr": float(best_cnr) if np.isfinite(best_cnr) else 0.0,
                     "eigenvalue": float(eig_val), "reference_sigma_A": float(ref_sigma)},
    )


def _partial_tiled(data, stats, col: _Collector, scan: ScanSites, opts, *, valids, cell_A,
                   ref_sigma, noiseless, dose, notes) -> None:
    """Partial templates of a periodic one-cell scan, evaluated on a tiled multi-cell field."""
    from tmask_validate import noise

    sites, step_A = scan.sites, scan.step_A
    popt = opts["partial"]
    cells = tuple(int(v) for v in popt["tile_cells"])
    scan_shape = tuple(int(v) for v in data.shape[:2])
    electrons = None
    src = data
    if dose is not None:
        electrons = noise.electrons_per_probe(float(dose), step_A)
        src = noiseless
        if tuple(np.shape(src)) != tuple(data.shape):
            raise ValueError(f"noiseless shape {np.shape(src)} != data shape {data.shape}")
    field, _ = tiled_field(np.asarray(src), sites, cell_A=cell_A, cells=cells,
                                electrons_per_probe=electrons, seed=int(popt["seed"]))
    fshape = field.shape[:2]
    # window: fraction of the field per direction, offset from the cell origin (need not align)
    wy, wx = (max(1, round(n * popt["fraction"])) for n in fshape)
    oy, ox = (int(round(o * n)) % f for o, n, f in zip(popt["window_offset_cells"], scan_shape,
                                                        fshape, strict=True))
    win = np.zeros(fshape, bool)
    win[np.ix_(np.arange(oy, oy + wy) % fshape[0], np.arange(ox, ox + wx) % fshape[1])] = True
    notes.append(f"partial: {cells[0]}x{cells[1]}-cell field tiled from the one-cell scan "
                 + ("(noiseless: the window holds one whole cell, partial = full mask by "
                    "periodicity)" if dose is None else
                    f"(independent Poisson noise, {electrons:.4g} e-/probe)")
                 + f"; window {wy}x{wx} px at ({oy}, {ox})")
    # field templates = the one-cell templates tiled (exactly periodic: building them from the
    # tiled site table would round half-pixel sites differently in different cells), zero
    # outside the window for the partial ones (templates.make_template(region=...) semantics)
    one = _template_sets(scan.with_periodic(True), opts=opts, kinds=["binary", "gaussian"],
                         sigmas=[ref_sigma])
    entries = []
    for tag, kind, sig, td in one:
        for lab, t1 in td.items():
            tw = np.tile(np.asarray(t1, np.float64), cells)
            if np.ptp(tw[win]) > 0:
                entries.append((tag, kind, sig, lab, tw * win, tw, t1))
            else:
                notes.append(f"partial: {tag} {lab} template is constant in the window; skipped")
    if not entries:
        return
    for norm in opts["templates"]["normalisations"]:
        valid = valids[norm]
        m_part = np.asarray(core.pcc_mask(field, _stack([(e[3], e[4]) for e in entries]),
                                          normalisation=norm, region=win, valid=valid))
        m_full = np.asarray(core.pcc_mask(field, _stack([(e[3], e[5]) for e in entries]),
                                          normalisation=norm, valid=valid))
        m_part = m_part.reshape(len(entries), *valid.shape)
        m_full = m_full.reshape(len(entries), *valid.shape)
        both = np.concatenate([m_part, m_full])
        imgs = np.asarray(core.apply_mask(data, both, normalised=True, normalisation=norm,
                                          stats=stats, valid=valid))
        imgs = imgs.reshape(2 * len(entries), *scan_shape)
        for i, (tag, kind, sig, lab, _, _, t1) in enumerate(entries):
            c = dict(family="partial", label=lab, template_kind=kind, sigma_A=sig)
            col.add(f"partial_{norm}_{tag}_{lab}", imgs[i], m_part[i], template=t1,
                    normalisation=norm, region="partial_tiled",
                    reference=f"partialref_{norm}_{tag}_{lab}", **c)
            col.add(f"partialref_{norm}_{tag}_{lab}", imgs[len(entries) + i], m_full[i],
                    template=t1, normalisation=norm, region="tiled_full",
                    **{**c, "family": "partial_ref"})


def _run_stack(data, stats, col: _Collector, entries, opts, *, region_name, region, valids):
    """PCC masks of a stack of templates (one pass per normalisation; pixels outside
    ``valids[normalisation]`` left out by the core ``valid`` keyword: mask 0 there) and their
    Eq. 7 images (one pass per normalisation, all-position statistics)."""
    if not entries:
        return
    stack = _stack([(n, t) for n, t, _ in entries])
    for norm in opts["templates"]["normalisations"]:
        valid = valids[norm]
        masks = np.asarray(core.pcc_mask(data, stack, normalisation=norm, region=region,
                                         valid=valid))
        if masks.ndim == 2:
            masks = masks[None]
        imgs = np.asarray(core.apply_mask(data, masks, normalised=True, normalisation=norm,
                                          stats=stats, valid=valid))
        if imgs.ndim == 2:
            imgs = imgs[None]
        for i, (name, t, coords) in enumerate(entries):
            if coords.get("family") == "adf_pcc" and norm != "pcc":
                continue
            nm = name.replace("{norm}", norm)
            if coords.get("family") == "template":  # full-scan species templates: tm_<...>
                nm = "tm_" + nm
            c = {k: (v.replace("{norm}", norm) if isinstance(v, str) else v)
                 for k, v in coords.items()}
            col.add(nm, imgs[i], masks[i], template=t, normalisation=norm, region=region_name,
                    **c)


def _cnr(image, scan: ScanSites, label, *, radius_A) -> float:
    """CNR of the ``label`` columns in ``image`` (:func:`tmask_validate.metrics.image_metrics`)."""
    from tmask_validate import metrics

    try:
        tab = metrics.image_metrics(image, scan.sites, radius_A=radius_A, **scan.geometry)
    except ValueError:
        return -np.inf
    sel = tab.loc[tab["label"] == label, "cnr"]
    if len(sel) == 0 or not np.isfinite(float(sel.iloc[0])):
        return -np.inf
    return float(sel.iloc[0])


def _to_dataset(col: _Collector, *, data_shape, calibration, center_px, angle, mean_pattern,
                regions, sites, ctl, dmat, dcol_angle, opts, cell_A, periodic, origin_A, meta,
                notes, extra_attrs, valid) -> xr.Dataset:
    sy, sx, ny, nx = data_shape
    cy, cx = center_px
    ky = (np.arange(ny) - cy) * calibration.mrad_per_px[0]
    kx = (np.arange(nx) - cx) * calibration.mrad_per_px[1]
    scan_y = origin_A[0] + np.arange(sy) * calibration.step_A[0]
    scan_x = origin_A[1] + np.arange(sx) * calibration.step_A[1]
    coords = {
        "name": np.array(col.names, dtype=str),
        "ky": ky, "kx": kx, "scan_y": scan_y, "scan_x": scan_x,
    }
    for key, vals in col.coords.items():
        arr = np.asarray(vals)
        if arr.dtype == object:
            arr = arr.astype(str)
        coords[key] = ("name", arr)
    ds = xr.Dataset(
        {
            "masks": (("name", "ky", "kx"), np.stack(col.masks)),
            "images": (("name", "scan_y", "scan_x"), np.stack(col.images)),
            "templates": (("name", "scan_y", "scan_x"), np.stack(col.tmpls)),
            "mean_pattern": (("ky", "kx"), mean_pattern.astype(np.float32)),
            "valid_pixels": (("ky", "kx"), np.asarray(valid, np.uint8)),
            "angle_mrad": (("ky", "kx"), np.asarray(angle, np.float32)),
            "dmatrix": (("d_row", "d_col"), dmat),
            "dmatrix_col_angle_mrad": (("d_col",), dcol_angle.astype(np.float32)),
        },
        coords=coords,
    )
    for key, reg in regions.items():
        ds[f"region_{key}"] = (("scan_y", "scan_x"), np.asarray(reg, np.uint8))
    for key, var in sites_to_variables(sites).items():
        ds[key] = var
    for key, tab in ctl.items():
        ds[f"control_{key}_y_A"] = (f"control_{key}",
                                    tab["y_A"].to_numpy(float))
        ds[f"control_{key}_x_A"] = (f"control_{key}",
                                    tab["x_A"].to_numpy(float))
    cal = calibration.to_dict()
    cal["center_px"] = [float(cy), float(cx)]
    ds.attrs.update({
        "calibration": json.dumps(cal),
        "options": json.dumps(opts),
        "cell_A": json.dumps(None if cell_A is None else [float(v) for v in cell_A]),
        "periodic": int(bool(periodic)),
        "origin_A": json.dumps(list(origin_A)),
        "analysis_version": ANALYSIS_VERSION,
        "notes": json.dumps(notes),
        "meta": json.dumps(meta, default=str),
        "control_keys": json.dumps(sorted(ctl)),
        **extra_attrs,
    })
    return ds


# ----------------------------------------------------------------------------------------------
# metrics of one analysed dataset
# ----------------------------------------------------------------------------------------------
def control_tables(ads: xr.Dataset) -> dict[str, pd.DataFrame]:
    """The control site tables stored by :func:`analyse_dataset` (label ``"fake"``)."""
    out = {}
    for key in json.loads(ads.attrs.get("control_keys", "[]")):
        out[key] = pd.DataFrame({"label": "fake",
                                 "y_A": ads[f"control_{key}_y_A"].values,
                                 "x_A": ads[f"control_{key}_x_A"].values})
    return out


def _eval_region(name: str, scan_shape) -> np.ndarray | None:
    if name != "bottom_half":
        return None
    reg = np.zeros(scan_shape, bool)
    reg[scan_shape[0] // 2:] = True
    return reg


#: families whose image was made from a template (template_pcc = Pearson(image, template))
_TEMPLATE_FAMILIES = ("template", "partial", "half", "control", "half_control", "adf_pcc")

#: per-label columns of metrics.image_metrics copied into the tidy table (``*_median``: the same
#: with the old median baseline, kept beside the interstitial one)
_PER_LABEL = ("signal", "contrast", "cnr", "relative", "crosstalk", "bright", "dark",
              "contrast_median", "cnr_median", "crosstalk_median")


def dataset_metrics(
    ads: xr.Dataset,
    sites: pd.DataFrame | None = None,
    *,
    radius_A: float | None = None,
    meta: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Tidy metrics table of an analysed dataset (one row per image x metric x species).

    For every image (multiplied by its ``polarity``: BF/ABF images are inverted so columns are
    bright) :func:`tmask_validate.metrics.image_metrics` is evaluated against the real site table
    (controls: real sites plus the control's ``fake`` sites, target ``fake``); split-half
    entries are evaluated on the bottom half of the scan only (``region``). The background is
    the interstitial one (pixels >= ``metrics.BACKGROUND_DISTANCE_A`` from every real column;
    see "Background" in :mod:`tmask_validate.metrics`); ``*_median`` rows repeat the
    baseline-dependent metrics with the old median background. Rows:

    - per species: ``signal``, ``contrast``, ``cnr``, ``relative``, ``contrast_median``,
      ``cnr_median`` and, for images made with a single-label template, the full signed
      crosstalk vector ``crosstalk`` X[A, B] (one row per species B), ``crosstalk_median``,
      ``bright``, ``dark``;
    - per image with a single-label target (species = target): ``specificity``
      (1 - max_{B != A} X[A, B], signed, not clipped), ``specificity_abs``
      (1 - max_{B != A} |X[A, B]|), ``target_bright`` (1 if the target columns are brighter
      than the background), and the old metric ``specificity_median`` (median background,
      1 - max_{B != A} max(X^med[A, B], 0)) with ``target_bright_median``;
    - ``template_pcc`` (species = target or "all"): Pearson correlation of the output image with
      its input template over the evaluation region - how far the output just reproduces the
      template. Wrong-site controls with a high value would reveal template bias;
    - ``mask_similarity`` (species = the reference entry): partial and split-half masks vs the
      full-scan mask of the same template (partial masks of a tiled field: vs the
      ``partialref_*`` mask of the whole field); ``image_similarity``: eigen-image vs ADF image.

    Returns
    -------
    pandas.DataFrame
        Columns ``name, family, target, template_kind, sigma_A, normalisation, region,
        eval_region, metric, species, value`` plus the ``meta`` keys (structure, thickness_nm,
        dose_key, dose_e_per_A2, ...) from ``ads.attrs['meta']`` updated with ``meta``.
    """
    from tmask_validate import metrics

    if sites is None:
        sites = sites_from_dataset(ads)
    opts = json.loads(ads.attrs["options"])
    radius_A = float(radius_A if radius_A is not None else opts["metrics"]["radius_A"])
    cal = json.loads(ads.attrs["calibration"])
    step_A = tuple(cal["step_A"])
    origin_A = tuple(json.loads(ads.attrs.get("origin_A", "[0, 0]")))
    periodic = bool(int(ads.attrs.get("periodic", 0)))
    info = {**json.loads(ads.attrs.get("meta", "{}")), **dict(meta or {})}
    ctl = control_tables(ads)
    rows: list[dict] = []
    ents = entries(ads)
    names = [e.name for e in ents]
    scan_shape = ads["images"].shape[1:]
    scan = ScanSites.of(sites, scan_shape, step_A=step_A, origin_A=origin_A, periodic=periodic)
    sites = scan.sites
    far = metrics.interstitial_pixels(scan_shape, sites, **scan.geometry)
    images_all = ads["images"].values
    for i, e in enumerate(ents):
        name = e.name
        base = _base_row(e)
        image = images_all[i].astype(np.float64) * float(e.polarity)
        s_eval, target = sites, (e.label or None)
        if e.family in ("control", "half_control"):
            if e.control_key not in ctl:
                continue
            s_eval = pd.concat([sites[["label", "y_A", "x_A"]], ctl[e.control_key]],
                               ignore_index=True)
            target = "fake"
        if target == "all" or e.family in ("abf_best",):
            target = None
        region = _eval_region(e.eval_region, scan_shape)
        try:
            tab = metrics.image_metrics(image, s_eval, radius_A=radius_A, region=region,
                                        target=target, name=name, interstitial=far,
                                        with_median=True, **scan.geometry)
        except ValueError as exc:
            warnings.warn(f"metrics for {name} skipped: {exc}", stacklevel=2)
            continue
        labels_ = tab["label"].astype(str).tolist()
        for m in _PER_LABEL:
            if m in tab:
                vals = tab[m].to_numpy(dtype=float)
                rows.extend({**base, "metric": m, "species": lab, "value": float(v)}
                            for lab, v in zip(labels_, vals, strict=True))
        tmpl = ads["templates"].values[i]
        if e.family in ("half", "half_control"):
            # held-out evaluation: compare with the unrestricted template of the same sites
            if e.reference in names:
                tmpl = ads["templates"].values[names.index(e.reference)]
        if e.family in _TEMPLATE_FAMILIES and np.ptp(tmpl) > 0:
            sel = np.ones(scan_shape, bool) if region is None else region
            rows.append({**base, "metric": "template_pcc", "species": target or "all",
                         "value": _pearson(image[sel], tmpl[sel])})
        if target is not None:
            others = tab[tab["label"] != target]
            x = others["crosstalk"].to_numpy(float)
            x_med = others["crosstalk_median"].to_numpy(float)
            spec = 1.0 - float(np.max(x)) if x.size else 1.0
            spec_abs = 1.0 - float(np.max(np.abs(x))) if x.size else 1.0
            spec_med = 1.0 - float(np.max(np.maximum(x_med, 0.0))) if x.size else 1.0
            bright = float(bool(tab["target_bright"].iloc[0]))
            bright_med = float(bool(tab["target_bright_median"].iloc[0]))
            for m, v in (("specificity", spec), ("specificity_abs", spec_abs),
                         ("target_bright", bright), ("specificity_median", spec_med),
                         ("target_bright_median", bright_med)):
                rows.append({**base, "metric": m, "species": target, "value": v})
    # mask similarities: partial / half vs full-scan masks of the same template
    idx = {n: i for i, n in enumerate(names)}
    masks = ads["masks"].values
    for e in ents:
        if e.family in ("partial", "half") and e.reference in idx:
            try:
                val = metrics.mask_similarity(masks[idx[e.name]], masks[idx[e.reference]])
            except ValueError:
                val = 0.0
            rows.append({**_base_row(e), "metric": "mask_similarity", "species": e.reference,
                         "value": float(val)})
    for e in ents:  # after the mask similarities (row order as before)
        if e.family == "eigen" and e.reference in idx:
            val = _pearson(images_all[idx[e.name]], images_all[idx[e.reference]])
            rows.append({**_base_row(e), "metric": "image_similarity", "species": e.reference,
                         "value": val})
    df = pd.DataFrame(rows)
    for key, val in info.items():
        if isinstance(val, list | dict):
            val = json.dumps(val)
        df[key] = val
    if len(df):
        df["value"] = df["value"].astype(float).fillna(0.0)
    return df


def _base_row(e: Entry) -> dict:
    """The descriptive columns of every metrics row of entry ``e``."""
    return {"name": e.name, "family": e.family, "target": e.label,
            "template_kind": e.template_kind, "sigma_A": float(e.sigma_A),
            "normalisation": e.normalisation, "region": e.region, "eval_region": e.eval_region,
            "reference": e.reference, "control": e.control, "control_of": e.control_of}
