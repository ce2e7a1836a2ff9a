"""Ti–O displacements across a 90° domain wall: ground truth, measurement error, sign flip.

The measurement itself (Ti columns refined on a Ti-specific image, O columns on an
O-specific image, Ti minus the centre of its four nearest O columns) is
:func:`tmask_validate.sites.ti_o_displacement_from_images`. This module adds what a
validation needs on top of it, on plain arrays and site tables (no abTEM, no plotting):

* :func:`known_ti_o_displacement`: the same quantity from the structure's own projected
  column positions (the site table of the simulated crystal), i.e. the answer;
* :func:`match_displacements`: measured and known displacement of the same Ti columns and
  the error vector (pm);
* :func:`wall_components`: displacement components parallel and normal to a wall along
  ``y - x = const`` (the parallel one reverses across a head-to-tail 90° wall, the normal one
  is continuous);
* :func:`flip_summary`: per domain, the mean parallel component with its standard error and
  whether the signs of the two domains differ beyond their errors.

Positions and displacements are in Å (``_A``) unless a name says ``_pm``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from tmask_validate import sites as sitesmod

#: unit vector (y, x) along a wall ``y - x = const``
WALL_PARALLEL_YX = np.array([1.0, 1.0]) / np.sqrt(2.0)
#: unit vector (y, x) normal to such a wall
WALL_NORMAL_YX = np.array([1.0, -1.0]) / np.sqrt(2.0)


def _positions(sites: pd.DataFrame, label: str) -> np.ndarray:
    sel = sites[sites["label"] == label]
    if sel.empty:
        raise ValueError(f"no sites labelled {label!r} (have {sorted(set(sites['label']))})")
    return sel[["y_A", "x_A"]].to_numpy(dtype=float)


def known_ti_o_displacement(sites: pd.DataFrame, *, cell_A: Sequence[float],
                            ti_label: str = "Ti+O", o_label: str = "O") -> pd.DataFrame:
    """Ti–O displacement of every Ti column from the structure's column positions.

    Same definition as :func:`tmask_validate.sites.ti_o_displacement` (Ti column minus the
    centre of its four nearest O columns), applied to the true projected positions of the
    site table (e.g. ``store_sites`` of a domain-wall simulation; the Ti+O column is placed at
    its Ti atom). Extra columns of ``sites`` (``domain``, ``wall_distance_A``) are carried over.
    """
    ti_rows = sites[sites["label"] == ti_label].reset_index(drop=True)
    out = sitesmod.ti_o_displacement(_positions(sites, ti_label), _positions(sites, o_label),
                                     cell_A=cell_A)
    # carry per-site columns of the Ti rows kept (rows are matched by position)
    idx = cKDTree(ti_rows[["y_A", "x_A"]].to_numpy()).query(out[["y_A", "x_A"]].to_numpy())[1]
    for col in ("domain", "wall_distance_A"):
        if col in ti_rows:
            out[col] = ti_rows[col].to_numpy()[idx]
    return out


def match_displacements(measured: pd.DataFrame, known: pd.DataFrame, *,
                        max_distance_A: float = 0.5) -> pd.DataFrame:
    """Pair measured and known displacements of the same Ti columns; error in pm.

    Each measured Ti column is paired with the nearest known Ti column within
    ``max_distance_A`` (measured positions are refined, so they differ slightly). Returns the
    known table's rows that were paired, with ``dy_meas_A, dx_meas_A``, ``err_y_pm,
    err_x_pm`` (measured − known) and ``err_pm`` (length of the error vector).
    """
    if measured.empty:
        raise ValueError("no measured displacements")
    if not max_distance_A > 0:
        raise ValueError(f"max_distance_A must be > 0, got {max_distance_A!r}")
    tree = cKDTree(known[["y_A", "x_A"]].to_numpy(dtype=float))
    d, idx = tree.query(measured[["y_A", "x_A"]].to_numpy(dtype=float))
    ok = d <= max_distance_A
    if not ok.any():
        raise ValueError(f"no measured Ti column lies within {max_distance_A} Å of a known one")
    out = known.iloc[idx[ok]].reset_index(drop=True).copy()
    m = measured[ok].reset_index(drop=True)
    out["dy_meas_A"] = m["dy_A"].to_numpy()
    out["dx_meas_A"] = m["dx_A"].to_numpy()
    out["err_y_pm"] = 100.0 * (out["dy_meas_A"] - out["dy_A"])
    out["err_x_pm"] = 100.0 * (out["dx_meas_A"] - out["dx_A"])
    out["err_pm"] = np.hypot(out["err_y_pm"], out["err_x_pm"])
    return out


def wall_components(dy_A: np.ndarray, dx_A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Components (Å) of displacements along and across a wall ``y - x = const``."""
    d = np.stack([np.asarray(dy_A, dtype=float), np.asarray(dx_A, dtype=float)], axis=-1)
    return d @ WALL_PARALLEL_YX, d @ WALL_NORMAL_YX


def _se(values: np.ndarray) -> float:
    """Standard error of the mean (nan for fewer than 2 values)."""
    v = np.asarray(values, dtype=float)
    return float(np.std(v, ddof=1) / np.sqrt(v.size)) if v.size > 1 else float("nan")


def flip_summary(table: pd.DataFrame, *, dy: str = "dy_A", dx: str = "dx_A",
                 domain: str = "domain", min_wall_distance_A: float = 1.5) -> pd.DataFrame:
    """Per domain: mean wall-parallel and wall-normal components and their standard errors.

    Only Ti columns at least ``min_wall_distance_A`` from the wall count (when the table has
    ``wall_distance_A``): the four O neighbours of a column lie within a/2 ≈ 2.0 Å, i.e. within
    1.42 Å of it across the wall, so closer columns mix the two domains by construction.
    The last row (``domain = "flip"``) says whether the mean parallel components of the two
    domains have opposite signs, each beyond 3 of its standard errors (``flipped``; with a
    zero spread, as for the structure itself, any non-zero means count), and gives the
    difference of the mean normal components (continuity).
    """
    if domain not in table:
        raise ValueError(f"table has no {domain!r} column")
    if "wall_distance_A" in table:
        table = table[table["wall_distance_A"] >= float(min_wall_distance_A)]
    par, nor = wall_components(table[dy].to_numpy(), table[dx].to_numpy())
    rows = []
    for dom in sorted(set(table[domain].tolist())):
        sel = table[domain].to_numpy() == dom
        n = int(sel.sum())
        rows.append({"domain": str(dom), "n": n,
                     "parallel_pm": 100.0 * float(par[sel].mean()),
                     "parallel_se_pm": 100.0 * _se(par[sel]),
                     "normal_pm": 100.0 * float(nor[sel].mean()),
                     "normal_se_pm": 100.0 * _se(nor[sel])})
    if len(rows) == 2:
        a, b = rows
        diff = a["parallel_pm"] - b["parallel_pm"]
        err = float(np.hypot(a["parallel_se_pm"], b["parallel_se_pm"]))
        # each domain's mean is non-zero beyond 3 standard errors, with opposite signs
        signif = all(abs(r["parallel_pm"]) > 3.0 * np.nan_to_num(r["parallel_se_pm"], nan=np.inf)
                     for r in (a, b))
        flipped = bool(signif and np.sign(a["parallel_pm"]) != np.sign(b["parallel_pm"]))
        rows.append({"domain": "flip", "n": a["n"] + b["n"], "parallel_pm": diff,
                     "parallel_se_pm": err,
                     "normal_pm": a["normal_pm"] - b["normal_pm"],
                     "normal_se_pm": float(np.hypot(a["normal_se_pm"], b["normal_se_pm"])),
                     "flipped": flipped})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# Fig. 4: masks from a homogeneous window applied to a field across a wall
# ---------------------------------------------------------------------------------------------


def window_region(scan_y_A: np.ndarray, scan_x_A: np.ndarray, y_A: Sequence[float],
                  x_A: Sequence[float]) -> np.ndarray:
    """Boolean (scan_y, scan_x) region of probe positions with ``y0 <= y < y1``, ``x0 <= x < x1``
    (absolute scan coordinates, Å)."""
    yy = np.asarray(scan_y_A, dtype=float)[:, None]
    xx = np.asarray(scan_x_A, dtype=float)[None, :]
    reg = (yy >= y_A[0]) & (yy < y_A[1]) & (xx >= x_A[0]) & (xx < x_A[1])
    if not reg.any():
        raise ValueError(f"window y {list(y_A)} x {list(x_A)} Å holds no probe position")
    return reg


def _halves(region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split a region into two halves of its rows (top, bottom) for cross-fitting."""
    rows = np.flatnonzero(region.any(axis=1))
    mid = rows[len(rows) // 2]
    top = region.copy()
    top[mid:] = False
    return top, region & ~top


def wall_masks_and_images(
    data,
    sites: pd.DataFrame,
    *,
    step_A: Sequence[float],
    origin_A: Sequence[float],
    window: np.ndarray,
    labels: Sequence[str] = ("O", "Ti+O", "Pb"),
    sigma_A: float = 0.3,
) -> dict:
    """PCC masks of species templates from a homogeneous ``window``, applied to the whole field.

    For every label a gaussian template of its sites (``sigma_A``) is correlated with the data
    over the window only (partial template), and the mask is applied to every probe position.
    Cross-fitting: the image inside the window comes from masks of the *other* half of the
    window (the window split by rows), so no pixel of the returned image is in-sample; outside
    the window the mask of the whole window is used (those pixels never entered it).

    Returns
    -------
    dict
        ``masks`` {label: (ky, kx)}, ``images`` {label: (scan_y, scan_x)} (cross-fitted),
        ``insample`` {label: image of the whole-window mask everywhere}, ``window``.
    """
    from tmask_validate import core, templates

    shape = tuple(int(v) for v in data.shape[:2])
    tpl = templates.species_templates(sites, shape, step_A=step_A, origin_A=origin_A,
                                      kind="gaussian", sigma_A=sigma_A, labels=list(labels),
                                      include_all=False)
    top, bottom = _halves(window)
    stats = core.column_stats(data)
    masks, images, insample = {}, {}, {}
    for label in labels:
        t = tpl[label]
        m_all = core.pcc_mask(data, t, region=window)
        m_top = core.pcc_mask(data, t, region=top)
        m_bot = core.pcc_mask(data, t, region=bottom)
        img_all = core.apply_mask(data, m_all, stats=stats)
        img = img_all.copy()
        img[top] = core.apply_mask(data, m_bot, stats=stats)[top]
        img[bottom] = core.apply_mask(data, m_top, stats=stats)[bottom]
        masks[label], images[label], insample[label] = m_all, img, img_all
    return {"masks": masks, "images": images, "insample": insample, "window": window,
            "templates": tpl}


def measure_wall_displacements(
    ti_image: np.ndarray,
    o_image: np.ndarray,
    sites: pd.DataFrame,
    *,
    step_A: Sequence[float],
    origin_A: Sequence[float],
    cell_A: Sequence[float],
    window_A: float = 0.6,
    edge_A: float | None = None,
) -> dict:
    """Measured vs known Ti–O displacements of a domain-wall field, and the sign flip.

    Ti(+O) columns are refined on ``ti_image`` and O columns on ``o_image`` (gaussian fits,
    :func:`tmask_validate.sites.ti_o_displacement_from_images`) starting from the structure's
    site table. Ti columns within ``edge_A`` of the field edge are left out: their O
    neighbours (a/2 away) would have fit windows clipped by the edge, which pulls the fitted
    position inwards (default ``edge_A`` = a/2 + ``window_A`` + one scan step). Sites are in
    absolute scan coordinates.

    Returns
    -------
    dict
        ``matched`` (:func:`match_displacements`, with ``domain``/``wall_distance_A``),
        ``flip`` (:func:`flip_summary` of the measured displacements), ``flip_known``
        (the same for the structure), ``err_pm`` summary (median, 90th percentile, max of the
        error length; mean error vector per domain).
    """
    oy, ox = (float(v) for v in origin_A)
    ny, nx = np.asarray(ti_image).shape
    if edge_A is None:
        edge_A = 0.5 * max(float(v) for v in cell_A) + window_A + max(float(v) for v in step_A)
    rel = sites.assign(y_A=sites["y_A"] - oy, x_A=sites["x_A"] - ox)
    inside = ((rel["y_A"] >= -1e-9) & (rel["y_A"] <= (ny - 1) * step_A[0] + 1e-9)
              & (rel["x_A"] >= -1e-9) & (rel["x_A"] <= (nx - 1) * step_A[1] + 1e-9))
    rel = rel[inside].reset_index(drop=True)
    meas = sitesmod.ti_o_displacement_from_images(
        ti_image, o_image, rel, step_A=step_A, cell_A=cell_A, window_A=window_A)
    known = known_ti_o_displacement(rel, cell_A=cell_A)
    far = ((meas["y_A"] >= edge_A) & (meas["y_A"] <= (ny - 1) * step_A[0] - edge_A)
           & (meas["x_A"] >= edge_A) & (meas["x_A"] <= (nx - 1) * step_A[1] - edge_A))
    matched = match_displacements(meas[far].reset_index(drop=True), known)
    matched["y_A"] += oy
    matched["x_A"] += ox
    flip = flip_summary(matched, dy="dy_meas_A", dx="dx_meas_A")
    flip_known = flip_summary(matched)
    err = {"n": int(len(matched)), "median_pm": float(np.median(matched["err_pm"])),
           "p90_pm": float(np.percentile(matched["err_pm"], 90)),
           "max_pm": float(matched["err_pm"].max())}
    for dom, g in matched.groupby("domain"):
        err[f"mean_err_yx_pm_domain{dom}"] = [float(g["err_y_pm"].mean()),
                                              float(g["err_x_pm"].mean())]
    return {"matched": matched, "flip": flip, "flip_known": flip_known, "err_pm": err}
