"""The paper's qualitative claims as measurable checks -> ``results/claims.csv``.

Each claim is evaluated on every dataset (structure x dose x thickness) it applies to, from the
tidy metrics table of :func:`tmask_validate.analysis.dataset_metrics` (aggregated by
``tmask-validate metrics``). One row per claim x dataset: the measured number, the threshold,
the comparison and ``passed``. Thresholds come from the config (``analysis.claims``); a claim
that fails is reported as failing, never tuned away.

Template images used: ``tm_pcc_binary_<label>`` (binary templates, Eq. 4 normalisation, as the
paper's LiFePO4 analysis), ``tm_pcc_g<sigma>_<label>`` with the configured reference gaussian
width (the paper's PbTiO3 templates) and ``tm_pcc_binary_all`` (all-atom template).

"Specific" always means: the target columns are brighter than the background (``target_bright``)
AND ``specificity`` (1 - the largest bright crosstalk onto another column type) >= the threshold.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["evaluate_claims", "label_for", "CLAIM_COLUMNS"]

CLAIM_COLUMNS = ["claim_id", "claim", "dataset", "structure", "dose_key", "thickness_nm",
                 "measured", "comparison", "threshold", "passed", "detail", "status"]


def label_for(labels, element: str) -> str | None:
    """Site label whose heaviest (first) element is ``element`` (e.g. 'Ti' -> 'Ti+O')."""
    labels = [str(x) for x in labels]
    for lab in labels:
        if lab.split("+")[0] == element:
            return lab
    for lab in labels:
        if element in lab.split("+"):
            return lab
    return None


def _get(d: pd.DataFrame, name: str, metric: str, species: str | None = None) -> float | None:
    sel = (d["name"] == name) & (d["metric"] == metric)
    if species is not None:
        sel &= d["species"] == species
    v = d.loc[sel, "value"]
    return None if v.empty else float(v.iloc[0])


def _specific(d: pd.DataFrame, name: str, label: str) -> tuple[float | None, bool]:
    spec = _get(d, name, "specificity", label)
    bright = _get(d, name, "target_bright", label)
    if spec is None:
        return None, False
    return spec, bool(bright and bright > 0.5)


def _row(cid, claim, key, measured, comparison, threshold, passed, detail="",
         informative=True) -> dict:
    """One claim check; ``informative=False`` (status "uninformative", passed False): the check
    is trivially satisfied by construction and says nothing about the claim."""
    s, dose, t = key
    status = ("pass" if passed else "fail") if informative else "uninformative"
    return {"claim_id": cid, "claim": claim, "dataset": f"{s}/{dose}/{t:g} nm",
            "structure": s, "dose_key": dose,
            "thickness_nm": t, "measured": float(measured) if measured is not None else np.nan,
            "comparison": comparison, "threshold": float(threshold),
            "passed": bool(passed) and informative, "detail": detail, "status": status}


def _builder(cfg: Mapping[str, Any] | None, structure: str, labels) -> str:
    if cfg and structure in cfg.get("structures", {}):
        return str(cfg["structures"][structure].get("builder", ""))
    if label_for(labels, "Li"):
        return "LiFePO4"
    if label_for(labels, "Pb"):
        return "PbTiO3"
    return ""


def _sigma_tag(sigma: float) -> str:
    return f"g{sigma:.2f}".rstrip("0").rstrip(".")


def evaluate_claims(
    metrics: pd.DataFrame,
    similarity: pd.DataFrame | None = None,
    *,
    config: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Evaluate every claim on every applicable dataset.

    Parameters
    ----------
    metrics : pandas.DataFrame
        Aggregated tidy metrics (``results/metrics/metrics.csv``).
    similarity : pandas.DataFrame, optional
        ``results/metrics/mask_similarity.csv`` (unused by the per-dataset claims; kept for
        cross-thickness checks).
    config : mapping, optional
        Validated config: thresholds (``analysis.claims``), reference gaussian width, builders.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`CLAIM_COLUMNS`; ``measured`` is NaN only where the data needed for a
        claim are absent (then ``passed`` is False and ``detail`` says why). ``status`` is
        "pass", "fail" or "uninformative" (trivially satisfied by construction: e.g. partial
        templates on noiseless periodic data; ``passed`` is False there).
    """
    from tmask_validate.analysis import analysis_options

    opts = analysis_options((config or {}).get("analysis"))
    th = opts["claims"]
    sig = opts["templates"]["reference_sigma_A"]
    sweep = opts["templates"]["gaussian_sigma_A"]
    if sig is None:
        sig = float(sorted(sweep)[len(sweep) // 2]) if sweep else 0.35
    gtag = _sigma_tag(sig)
    rows: list[dict] = []
    if metrics.empty:
        return pd.DataFrame(columns=CLAIM_COLUMNS)
    m = metrics.copy()
    m["species"] = m["species"].fillna("").astype(str)
    m["thickness_key"] = m["thickness_config_nm"].fillna(m["thickness_nm"]).astype(float)
    spec_min = th["specificity_min"]
    for key, d in m.groupby(["structure", "dose_key", "thickness_key"], sort=True):
        key = (str(key[0]), str(key[1]), float(key[2]))
        labels = [x for x in d.loc[d["metric"] == "cnr", "species"].unique() if x != "fake"]
        builder = _builder(config, key[0], labels)
        # ---- LiFePO4: O and Li specific, Fe/P crosstalk, all-atom vs ABF ----
        if builder == "LiFePO4":
            for cid, el in (("O_specific", "O"), ("Li_specific", "Li")):
                lab = label_for(labels, el)
                name = f"tm_pcc_binary_{lab}"
                spec, bright = _specific(d, name, lab) if lab else (None, False)
                rows.append(_row(cid, f"{el} template image is specific to {el} columns", key,
                                 spec, ">=", spec_min,
                                 spec is not None and bright and spec >= spec_min,
                                 f"{name}; target bright={bright}"))
            fe, p = label_for(labels, "Fe"), label_for(labels, "P")
            if fe and p:
                x1 = _get(d, f"tm_pcc_binary_{fe}", "bright", p)
                x2 = _get(d, f"tm_pcc_binary_{p}", "bright", fe)
                meas = None if x1 is None or x2 is None else min(x1, x2)
                rows.append(_row("FeP_crosstalk", "Fe and P columns show mutual crosstalk", key,
                                 meas, ">=", th["crosstalk_min"],
                                 meas is not None and meas >= th["crosstalk_min"],
                                 f"bright X[Fe->P]={x1}, X[P->Fe]={x2}"))
            li = label_for(labels, "Li")
            if li:
                c_all = _get(d, "tm_pcc_binary_all", "cnr", li)
                for ref, what in (("abf", "virtual ABF (config radii)"),
                                  ("abf_best", "best ABF of the radius sweep")):
                    c_ref = _get(d, ref, "cnr", li)
                    meas = None if c_all is None or c_ref is None else c_all - c_ref
                    rows.append(_row(
                        f"all_beats_{ref}", f"all-atom template image beats inverted {what} "
                        "on Li CNR", key, meas, ">", 0.0, meas is not None and meas > 0,
                        f"CNR(Li): template {c_all}, inverted {ref} {c_ref}"))
            for cid, el in (("O_heldout", "O"), ("Li_heldout", "Li")):
                lab = label_for(labels, el)
                name = f"half_pcc_binary_{lab}"
                spec, bright = _specific(d, name, lab) if lab else (None, False)
                rows.append(_row(cid, f"{el} mask from the top half stays specific on the "
                                 "held-out bottom half", key, spec, ">=", spec_min,
                                 spec is not None and bright and spec >= spec_min,
                                 f"{name}; target bright={bright}"))
        # ---- PbTiO3: binary Ti loses specificity, gaussian restores it ----
        if builder in ("PbTiO3", "PbTiO3_DW"):
            ti = label_for(labels, "Ti")
            if ti:
                spec_b, bright_b = _specific(d, f"tm_pcc_binary_{ti}", ti)
                lost = spec_b is None or (not bright_b) or spec_b < spec_min
                rows.append(_row("Ti_binary_loses", "binary Ti template loses specificity "
                                 "(Pb also bright)", key, spec_b, "<", spec_min,
                                 spec_b is not None and lost,
                                 f"tm_pcc_binary_{ti}; target bright={bright_b}"))
                spec_g, bright_g = _specific(d, f"tm_pcc_{gtag}_{ti}", ti)
                best = [(_get(d, f"tm_pcc_{_sigma_tag(s)}_{ti}", "specificity", ti), s)
                        for s in sweep]
                best_txt = ", ".join(f"sigma {s}: {v:.3g}" for v, s in best if v is not None)
                rows.append(_row("Ti_gaussian_restores", f"gaussian Ti template (sigma {sig} A) "
                                 "restores specificity", key, spec_g, ">=", spec_min,
                                 spec_g is not None and bright_g and spec_g >= spec_min,
                                 f"target bright={bright_g}; sweep: {best_txt}"))
            o = label_for([x for x in labels if x.split("+")[0] == "O"], "O")
            if o:
                spec_o, bright_o = _specific(d, f"tm_pcc_{gtag}_{o}", o)
                rows.append(_row("PTO_O_specific", "O columns (invisible in ADF) are extracted "
                                 "specifically", key, spec_o, ">=", spec_min,
                                 spec_o is not None and bright_o and spec_o >= spec_min,
                                 f"tm_pcc_{gtag}_{o}; target bright={bright_o}"))
        # ---- every structure: partial templates, eigen-image, controls ----
        part = d[(d["metric"] == "mask_similarity") & (d["family"] == "partial")
                 & (d["normalisation"] == "pcc") & (d["name"].str.contains(f"_{gtag}_"))]
        if not part.empty:
            meas = float(part["value"].min())
            worst = part.loc[part["value"].idxmin(), "name"]
            tiled = bool((part["region"] == "partial_tiled").all())
            noiseless = "dose_e_per_A2" not in d or d["dose_e_per_A2"].isna().all()
            trivial = tiled and noiseless
            detail = f"min over labels ({worst})"
            if tiled:
                detail += ("; 1/9 window of a tiled multi-cell field vs the whole field"
                           + (" - noiseless periodic data: the window is one whole cell, the "
                              "masks agree by construction (not informative)" if trivial
                              else " (independent Poisson noise per position)"))
            else:
                detail += "; 1/9 window of the scanned field vs the full scan"
            rows.append(_row("partial_reproduces", "partial (1/9) templates reproduce the "
                             "full-data masks", key, meas, ">=", th["mask_pcc_min"],
                             meas >= th["mask_pcc_min"], detail, informative=not trivial))
        e = _get(d, "eigen", "image_similarity")
        if e is not None:
            rows.append(_row("adf_is_eigen", "virtual ADF image is close to the leading "
                             "eigen-image of C", key, e, ">=", th["eigen_pcc_min"],
                             e >= th["eigen_pcc_min"], "Pearson(eigen-image, ADF)"))
        rows.extend(_control_rows(d, key, th["control_ratio_max"]))
    # ---- iCoM vs thickness (noiseless LiFePO4-like and PbTiO3 datasets) ----
    rows.extend(_icom_rows(m, th["icom_thick_nm"], config))
    out = pd.DataFrame(rows, columns=CLAIM_COLUMNS)
    return out


def _control_rows(d: pd.DataFrame, key, ratio_max: float) -> list[dict]:
    """Controls vs true templates of the SAME template kind (binary vs binary, gaussian of one
    width vs the same width), pcc normalisation; the worst (largest) ratio over kinds counts."""
    rows = []
    true = d[(d["family"] == "template") & (d["normalisation"] == "pcc")
             & (d["target"] != "all") & (d["target"] != "")]
    kinds = lambda x: x["template_kind"] + ":" + x["sigma_A"].astype(str)  # noqa: E731
    for fam, cid, what in (("control", "controls_not_specific", "full scan"),
                           ("half_control", "heldout_controls_not_specific",
                            "held-out bottom half")):
        c = d[(d["family"] == fam) & (d["normalisation"] == "pcc")]
        for metric, cid_m, claim in (
                ("cnr", cid, f"random/shifted-site control templates are NOT specific ({what}): "
                             "fake-site CNR / median true-target CNR (same template kind)"),
                ("template_pcc", "controls_not_reproduced" if fam == "control" else None,
                 "control images do not reproduce their (wrong-site) templates: "
                 "template_pcc / median true (same template kind)")):
            if cid_m is None:
                continue
            cm = c[c["metric"] == metric]
            if metric == "cnr":
                cm = cm[cm["species"] == "fake"]
                tm = true[(true["metric"] == "cnr") & (true["species"] == true["target"])]
            else:
                tm = true[true["metric"] == "template_pcc"]
            if cm.empty or tm.empty:
                continue
            worst, detail = -np.inf, []
            for k, g in cm.groupby(kinds(cm)):
                ref = tm[kinds(tm) == k]["value"]
                if ref.empty:
                    continue
                med = float(np.median(ref))
                ratio = float(g["value"].max()) / med if med > 0 else np.inf
                detail.append(f"{k}: max control {float(g['value'].max()):.3g} / median true "
                              f"{med:.3g}")
                worst = max(worst, ratio)
            if not detail:
                continue
            rows.append(_row(cid_m, claim, key, worst, "<=", ratio_max, worst <= ratio_max,
                             "; ".join(detail)))
    return rows


def _mean_cnr(d: pd.DataFrame, name: str) -> float | None:
    v = d[(d["name"] == name) & (d["metric"] == "cnr") & (d["species"] != "fake")]["value"]
    return None if v.empty else float(v.mean())


def _icom_rows(m: pd.DataFrame, thick_nm: float, config) -> list[dict]:
    rows = []
    for (s, dose), d in m.groupby(["structure", "dose_key"], sort=True):
        ts = sorted(d["thickness_key"].unique())
        if len(ts) < 2:
            continue
        t_thin = ts[0]
        t_thick = min(ts, key=lambda t: abs(t - thick_nm))
        if t_thick == t_thin:
            continue
        thin = _mean_cnr(d[d["thickness_key"] == t_thin], "icom")
        thick = _mean_cnr(d[d["thickness_key"] == t_thick], "icom")
        if thin is None or thick is None:
            continue
        note = "" if abs(t_thick - thick_nm) < 10 else (
            f" (nearest available {t_thick:g} nm is far from {thick_nm:g} nm)")
        rows.append(_row("icom_degrades", f"iCoM degrades with thickness: mean column CNR at "
                         f"{t_thick:g} nm / at {t_thin:g} nm", (str(s), str(dose), t_thick),
                         thick / thin if thin > 0 else np.inf, "<", 1.0,
                         thin > 0 and thick / thin < 1.0,
                         f"mean CNR thin {thin:.3g}, thick {thick:.3g}{note}"))
        tm = _mean_cnr(d[d["thickness_key"] == t_thick], "tm_pcc_binary_all")
        if tm is not None:
            rows.append(_row("template_beats_icom_thick", "all-atom template image beats iCoM "
                             "(mean column CNR) at the thick end", (str(s), str(dose), t_thick),
                             tm - thick, ">", 0.0, tm > thick,
                             f"template {tm:.3g}, iCoM {thick:.3g}{note}"))
    return rows
