"""The paper's qualitative claims as measurable checks -> ``results/claims.csv``.

Each claim is evaluated on every dataset (structure x dose x thickness) it applies to, from the
tidy metrics table of :func:`tmask_validate.analysis.dataset_metrics` (aggregated by
``tmask-validate metrics``) and, for species detection, from the evidence table
``results/species_evidence.csv`` (:mod:`tmask_validate.evidence`). One row per claim x dataset
(x species where the claim is per species): the measured number, the threshold, the comparison,
``status`` and ``passed``. Thresholds come from the config (``analysis.claims``); a claim that
fails is reported as failing, never tuned away.

``status`` is ``pass``, ``fail`` or ``uninformative``: a claim is uninformative when the check
cannot say anything about it - its own control fails (a wrong-site template of the same kind is
as bright, relative to the claim's target, as the target itself), the reference it needs is not
in the data (iCoM degradation needs a thickness <= 4 nm), or it is satisfied by construction.
``passed`` is True only for ``pass``.

``role``: ``evidence`` (species detection from held-out, cross-fitted images against the
species-removed control and a random-site null; :mod:`tmask_validate.evidence`), ``comparison``
(template vs ABF / iCoM on the light columns), ``diagnostic`` (in-sample template images: a PCC
mask reproduces almost any template in-sample, so their specificity is a *template imprint*,
not evidence of the species) and ``check`` (controls, partial templates, eigen-image).

``baseline_sensitive``: every metric-based claim is evaluated twice, with the interstitial
background and with the old median background (``*_median`` metrics,
:mod:`tmask_validate.metrics`); True where the two statuses differ (``status_median``).

Template images used: ``tm_pcc_binary_<label>`` (binary templates, Eq. 4 normalisation, as the
paper's LiFePO4 analysis), ``tm_pcc_g<sigma>_<label>`` with the configured reference gaussian
width (the paper's PbTiO3 templates) and ``tm_pcc_binary_all`` (all-atom template). Controls:
``ctl_shift_..._<label>`` (the label's sites moved away from every column) and
``ctl_random_...`` (random interstitial sites) of the same normalisation and template kind; each
is divided by ITS OWN target's value (the shifted-Li control by the Li template's Li CNR, the
random control by the target of the claim it is checked for).

"Specific" always means: the target columns are brighter than the background (``target_bright``)
AND ``specificity`` (1 - the largest signed crosstalk onto another column type) >= the threshold.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["evaluate_claims", "label_for", "light_labels", "read_evidence", "CLAIM_COLUMNS",
           "EVIDENCE_COLUMNS", "REFERENCE_THIN_NM"]

CLAIM_COLUMNS = ["claim_id", "claim", "role", "dataset", "structure", "dose_key", "thickness_nm",
                 "species", "measured", "comparison", "threshold", "passed", "detail", "status",
                 "status_median", "baseline_sensitive"]
#: columns of results/species_evidence.csv (the evidence contract)
EVIDENCE_COLUMNS = ["structure", "species", "template", "thickness_nm", "dose_e_per_A2",
                    "occupancy", "contrast_present", "contrast_absent", "evidence_z", "null_p",
                    "verdict"]
#: iCoM degradation is measured against a thickness at most this (nm)
REFERENCE_THIN_NM = 4.0
#: heaviest atomic number of a "light" column (Li, O)
_LIGHT_Z = 8
_Z_LIGHT = {"H": 1, "He": 2, "Li": 3, "Be": 4, "B": 5, "C": 6, "N": 7, "O": 8}
#: metrics that depend on the background, and their median-baseline twins
_BASELINE_METRICS = ("contrast", "cnr", "crosstalk", "specificity", "target_bright")


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


def light_labels(labels) -> list[str]:
    """Labels whose every element is light (Z <= 8: Li, O; not P+O, Ti+O)."""
    out = []
    for lab in labels:
        els = str(lab).split("+")
        if els and all(e in _Z_LIGHT and _Z_LIGHT[e] <= _LIGHT_Z for e in els):
            out.append(str(lab))
    return out


@dataclass(frozen=True)
class _Entry:
    """Which analysis entry a claim reads, by its typed fields (never by parsing names)."""

    family: str
    target: str
    kind: str = "binary"
    sigma_A: float = 0.0
    normalisation: str = "pcc"
    control: str = ""
    control_of: str = ""


def _find(d: pd.DataFrame, e: _Entry) -> str | None:
    """Name of the entry of ``d`` with the fields of ``e`` (None if absent)."""
    sel = ((d["family"] == e.family) & (d["target"] == e.target)
           & (d["template_kind"] == e.kind) & (d["normalisation"] == e.normalisation)
           & np.isclose(d["sigma_A"].astype(float), e.sigma_A)
           & (d["control"] == e.control) & (d["control_of"] == e.control_of))
    names = d.loc[sel, "name"].unique()
    return str(names[0]) if len(names) else None


def _tag_txt(tag: tuple[str, float]) -> str:
    return tag[0] if tag[0] != "gaussian" else f"gaussian {tag[1]:g} A"


def _kind(tag: tuple[str, float]) -> dict:
    return {"kind": tag[0], "sigma_A": float(tag[1])}


def _get(d: pd.DataFrame, name: str | None, metric: str,
         species: str | None = None) -> float | None:
    if name is None:
        return None
    sel = (d["name"] == name) & (d["metric"] == metric)
    if species is not None:
        sel &= d["species"] == species
    v = d.loc[sel, "value"]
    return None if v.empty else float(v.iloc[0])


def _specific(d: pd.DataFrame, name: str | None, label: str) -> tuple[float | None, bool]:
    spec = _get(d, name, "specificity", label)
    bright = _get(d, name, "target_bright", label)
    if spec is None:
        return None, False
    return spec, bool(bright and bright > 0.5)


def _row(cid, claim, key, measured, comparison, threshold, passed, detail="",
         informative=True, *, role="diagnostic", species="") -> dict:
    """One claim check; ``informative=False`` (status "uninformative", passed False): the check
    cannot say anything about the claim (failing control, missing reference, by construction)."""
    s, dose, t = key
    status = ("pass" if passed else "fail") if informative else "uninformative"
    thr = np.nan if threshold is None else float(threshold)
    return {"claim_id": cid, "claim": claim, "role": role, "dataset": f"{s}/{dose}/{t:g} nm",
            "structure": s, "dose_key": dose, "thickness_nm": t, "species": species,
            "measured": float(measured) if measured is not None else np.nan,
            "comparison": comparison, "threshold": thr,
            "passed": bool(passed) and informative, "detail": detail, "status": status}


def _builder(cfg: Mapping[str, Any] | None, structure: str, labels) -> str:
    if cfg and structure in cfg.get("structures", {}):
        return str(cfg["structures"][structure].get("builder", ""))
    if label_for(labels, "Li"):
        return "LiFePO4"
    if label_for(labels, "Pb"):
        return "PbTiO3"
    return ""


# ----------------------------------------------------------------------------------------------
# controls, each against its own target
# ----------------------------------------------------------------------------------------------
def _own_control(d: pd.DataFrame, label: str, *, tag: tuple[str, float],
                 held_out: bool = False, metric: str = "cnr",
                 norm: str = "pcc") -> tuple[float | None, str]:
    """Worst control ratio for the claim about ``label``: the shifted-``label`` and the random
    control (same normalisation and template kind ``tag``) over the ``label`` template's own
    value (``metric`` = "cnr": fake-site CNR / target CNR; "template_pcc": control template_pcc
    / target template_pcc). None when no control is in the data."""
    fam, cfam = ("half", "half_control") if held_out else ("template", "control")
    true_name = _find(d, _Entry(fam, label, normalisation=norm, **_kind(tag)))
    ref = _get(d, true_name, metric, label)
    ratios, parts = [], []
    for ctl, of in (("shift", label), ("random", "")):
        cname = _find(d, _Entry(cfam, "fake", normalisation=norm, control=ctl, control_of=of,
                                **_kind(tag)))
        val = _get(d, cname, metric, "fake")
        if val is None:
            continue
        if ref is None or ref <= 0:
            # the target itself is not bright (or absent): a ratio to it means nothing
            return None, (f"{true_name} {metric} " + ("absent" if ref is None else f"{ref:.3g}")
                          + ": target not bright, control not applicable")
        ratios.append(val / ref)
        parts.append(f"{cname} {val:.3g} / {true_name} {ref:.3g}")
    if not ratios:
        return None, ""
    return float(max(ratios)), "; ".join(parts)


def _with_control(row: dict, d: pd.DataFrame, label: str, *, tag: tuple[str, float],
                  ratio_max: float,
                  held_out: bool = False) -> dict:
    """Mark ``row`` uninformative when the claim's own control fails (ratio > ratio_max)."""
    ratio, detail = _own_control(d, label, tag=tag, held_out=held_out)
    if ratio is None:
        row["detail"] += "; " + (detail or "no control in the data")
        return row
    row["detail"] += f"; own control ratio {ratio:.3g} (max {ratio_max:g}): {detail}"
    if ratio > ratio_max and row["status"] != "uninformative":
        row["status"], row["passed"] = "uninformative", False
        row["detail"] += " - control FAILS: the template makes any sites bright"
    return row


def _control_rows(d: pd.DataFrame, key, ratio_max: float, labels, tags) -> list[dict]:
    """Controls vs their own targets: for every label and template kind, the shifted-label and
    the random control over the label's true template; the worst ratio over labels counts."""
    rows = []
    for held_out, cid, what in ((False, "controls_not_specific", "full scan"),
                                (True, "heldout_controls_not_specific", "held-out bottom half")):
        for metric, cid_m, claim in (
                ("cnr", cid, f"random/shifted-site control templates are NOT specific ({what}): "
                             "fake-site CNR / CNR of the control's own target (same kind)"),
                ("template_pcc", None if held_out else "controls_not_reproduced",
                 "control images do not reproduce their (wrong-site) templates: "
                 "template_pcc / that of the control's own target (same kind)")):
            if cid_m is None:
                continue
            worst, worst_txt, moot = -np.inf, "", []
            for tag in tags:
                for lab in labels:
                    r, txt = _own_control(d, lab, tag=tag, held_out=held_out, metric=metric)
                    if r is None and txt:
                        moot.append(f"{_tag_txt(tag)} {lab}")
                    if r is not None and r > worst:
                        worst, worst_txt = r, f"worst {_tag_txt(tag)} {lab}: {txt}"
            note = f"; not applicable (target not bright): {', '.join(moot)}" if moot else ""
            if worst == -np.inf:
                if moot:
                    rows.append(_row(cid_m, claim, key, None, "<=", ratio_max, False,
                                     note[2:], informative=False, role="check"))
                continue
            rows.append(_row(cid_m, claim, key, worst, "<=", ratio_max, worst <= ratio_max,
                             worst_txt + note, role="check"))
    return rows


# ----------------------------------------------------------------------------------------------
# evidence table
# ----------------------------------------------------------------------------------------------
def read_evidence(evidence: pd.DataFrame | str | os.PathLike | None) -> pd.DataFrame | None:
    """The species-evidence table (path or DataFrame) with its columns checked; None passes."""
    if evidence is None:
        return None
    ev = evidence if isinstance(evidence, pd.DataFrame) else pd.read_csv(
        evidence, keep_default_na=False, na_values=[""])
    missing = [c for c in EVIDENCE_COLUMNS if c not in ev.columns]
    if missing:
        raise ValueError(f"evidence table lacks columns {missing} (need {EVIDENCE_COLUMNS})")
    bad = sorted(set(ev["verdict"].astype(str)) - {"detected", "not detected", "uninformative"})
    if bad:
        raise ValueError(f"evidence verdicts must be detected / not detected / uninformative, "
                         f"got {bad}")
    return ev


def _dose_keys(metrics: pd.DataFrame) -> dict[float, str]:
    if "dose_e_per_A2" not in metrics or "dose_key" not in metrics:
        return {}
    d = metrics[["dose_e_per_A2", "dose_key"]].dropna().drop_duplicates()
    return {float(v): str(k) for v, k in zip(d["dose_e_per_A2"], d["dose_key"], strict=True)}


def _evidence_rows(ev: pd.DataFrame, metrics: pd.DataFrame, config) -> list[dict]:
    """Li_detected / O_detected (LiFePO4) and PTO_O_detected (PbTiO3) per template x thickness
    x dose, from the full-occupancy rows of the evidence table (verdicts as the evidence stage
    decided them: detected -> pass, not detected -> fail, uninformative -> uninformative)."""
    from tmask_validate.workflow import targets  # the workflow's dose keys (pure formatting)

    rows = []
    dkeys = _dose_keys(metrics)
    ev = ev.assign(occupancy=pd.to_numeric(ev["occupancy"], errors="coerce").fillna(1.0))
    occ = ev["occupancy"]
    full = ev[np.isclose(occ, occ.groupby([ev["structure"], ev["species"]]).transform("max"))]
    for r in full.itertuples(index=False):
        s, sp = str(r.structure), str(r.species)
        builder = _builder(config, s, [sp])
        el = sp.split("+")[0]
        if builder == "LiFePO4" and el in ("Li", "O") and sp == el:
            cid = f"{el}_detected"
        elif builder in ("PbTiO3", "PbTiO3_DW") and sp == "O":
            cid = "PTO_O_detected"
        else:
            cid = f"{sp}_detected"
        dose = float(r.dose_e_per_A2) if pd.notna(r.dose_e_per_A2) else None
        dk = "noiseless" if dose is None or not np.isfinite(dose) else dkeys.get(
            dose, targets.dose_key(dose))
        key = (s, dk, float(r.thickness_nm))
        v = str(r.verdict)
        row = _row(cid, f"{sp} detected on held-out cells against its removed-{sp} control "
                   "and a random-site null", key, r.evidence_z, "verdict", None,
                   v == "detected",
                   f"template {r.template}; occupancy {r.occupancy:g}; contrast present "
                   f"{float(r.contrast_present):.3g}, removed {float(r.contrast_absent):.3g}; "
                   f"evidence_z {float(r.evidence_z):.3g}; null p {float(r.null_p):.3g}; "
                   f"verdict {v}", informative=v != "uninformative", role="evidence",
                   species=sp)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------
def _median_view(m: pd.DataFrame) -> pd.DataFrame:
    """The metrics with every baseline-dependent metric replaced by its ``*_median`` twin (a
    metric without a twin in the table is kept as it is)."""
    present = set(m["metric"].unique())
    med = {f"{x}_median": x for x in _BASELINE_METRICS if f"{x}_median" in present}
    if not med:
        return m
    keep = m[~m["metric"].isin(list(med.values()))].copy()
    keep["metric"] = keep["metric"].replace(med)
    return keep


def evaluate_claims(
    metrics: pd.DataFrame,
    similarity: pd.DataFrame | None = None,
    *,
    config: Mapping[str, Any] | None = None,
    evidence: pd.DataFrame | str | os.PathLike | None = None,
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
    evidence : pandas.DataFrame or path, optional
        ``results/species_evidence.csv`` (columns :data:`EVIDENCE_COLUMNS`): adds the
        species-detection claims ``Li_detected``, ``O_detected`` and ``PTO_O_detected``.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`CLAIM_COLUMNS`; ``measured`` is NaN only where the data needed for a
        claim are absent (then ``passed`` is False and ``detail`` says why). ``status`` is
        "pass", "fail" or "uninformative"; ``status_median`` the status with the old median
        background and ``baseline_sensitive`` whether the two differ (always False for the
        evidence rows, which do not use these metrics).
    """
    ev = read_evidence(evidence)
    if metrics.empty and ev is None:
        return pd.DataFrame(columns=CLAIM_COLUMNS)
    m = metrics.copy()
    if not m.empty:
        for col in ("species", "target", "template_kind", "normalisation", "control",
                    "control_of"):
            m[col] = (m[col] if col in m else pd.Series("", index=m.index)).fillna("").astype(
                str)
        m["sigma_A"] = pd.to_numeric(m["sigma_A"], errors="coerce").fillna(0.0) if (
            "sigma_A" in m) else 0.0
        m["thickness_key"] = m["thickness_config_nm"].fillna(m["thickness_nm"]).astype(float)
    new = _metric_claims(m, config) if not m.empty else []
    old = _metric_claims(_median_view(m), config) if not m.empty else []
    old_status = {(r["claim_id"], r["dataset"], r["species"]): r["status"] for r in old}
    for r in new:
        r["status_median"] = old_status.get((r["claim_id"], r["dataset"], r["species"]), "")
        r["baseline_sensitive"] = bool(r["status_median"]) and r["status_median"] != r["status"]
    if ev is not None:
        for r in _evidence_rows(ev, m, config):
            r["status_median"], r["baseline_sensitive"] = r["status"], False
            new.append(r)
    return pd.DataFrame(new, columns=CLAIM_COLUMNS)


def _metric_claims(m: pd.DataFrame, config) -> list[dict]:
    from tmask_validate.analysis import analysis_options

    opts = analysis_options((config or {}).get("analysis"))
    th = opts["claims"]
    sig = opts["templates"]["reference_sigma_A"]
    sweep = opts["templates"]["gaussian_sigma_A"]
    if sig is None:
        sig = float(sorted(sweep)[len(sweep) // 2]) if sweep else 0.35
    binary, gauss = ("binary", 0.0), ("gaussian", float(sig))
    rows: list[dict] = []
    spec_min = th["specificity_min"]
    ratio_max = th["control_ratio_max"]
    imprint = "template imprint (in-sample diagnostic, not evidence): "
    for key, d in m.groupby(["structure", "dose_key", "thickness_key"], sort=True):
        key = (str(key[0]), str(key[1]), float(key[2]))
        labels = [x for x in d.loc[d["metric"] == "cnr", "species"].unique() if x != "fake"]
        builder = _builder(config, key[0], labels)
        light = light_labels(labels)
        # ---- LiFePO4: O and Li images (diagnostic), Fe/P crosstalk, all-atom vs ABF ----
        if builder == "LiFePO4":
            for cid, el in (("O_specific", "O"), ("Li_specific", "Li")):
                lab = label_for(labels, el)
                name = _find(d, _Entry("template", lab)) if lab else None
                spec, bright = _specific(d, name, lab) if lab else (None, False)
                row = _row(cid, imprint + f"{el} template image is specific to {el} columns",
                           key, spec, ">=", spec_min,
                           spec is not None and bright and spec >= spec_min,
                           f"{name}; target bright={bright}", species=lab or el)
                rows.append(_with_control(row, d, lab, tag=binary, ratio_max=ratio_max)
                            if lab else row)
            fe, p = label_for(labels, "Fe"), label_for(labels, "P")
            if fe and p:
                x1 = _get(d, _find(d, _Entry("template", fe)), "crosstalk", p)
                x2 = _get(d, _find(d, _Entry("template", p)), "crosstalk", fe)
                meas = None if x1 is None or x2 is None else min(x1, x2)
                rows.append(_row("FeP_crosstalk", imprint + "Fe and P columns show mutual "
                                 "crosstalk", key, meas, ">=", th["crosstalk_min"],
                                 meas is not None and meas >= th["crosstalk_min"],
                                 f"X[Fe->P]={x1}, X[P->Fe]={x2}", species=f"{fe},{p}"))
            for sp in light:
                c_all = _get(d, _find(d, _Entry("template", "all")), "cnr", sp)
                for ref, what in (("abf", "virtual ABF (config radii)"),
                                  ("abf_best", "best ABF of the radius sweep")):
                    c_ref = _get(d, ref, "cnr", sp)
                    meas = None if c_all is None or c_ref is None else c_all - c_ref
                    rows.append(_row(
                        f"all_beats_{ref}", f"all-atom template image beats inverted {what} "
                        f"on the light {sp} columns (CNR)", key, meas, ">", 0.0,
                        meas is not None and meas > 0,
                        f"CNR({sp}): template {c_all}, inverted {ref} {c_ref}",
                        role="comparison", species=sp))
            for cid, el in (("O_heldout", "O"), ("Li_heldout", "Li")):
                lab = label_for(labels, el)
                name = _find(d, _Entry("half", lab)) if lab else None
                spec, bright = _specific(d, name, lab) if lab else (None, False)
                row = _row(cid, f"{el} mask from the top half stays specific on the held-out "
                           "bottom half (one cell: under-determined, diagnostic)", key, spec,
                           ">=", spec_min, spec is not None and bright and spec >= spec_min,
                           f"{name}; target bright={bright}", species=lab or el)
                rows.append(_with_control(row, d, lab, tag=binary, ratio_max=ratio_max,
                                          held_out=True) if lab else row)
        # ---- PbTiO3: binary Ti loses specificity, gaussian restores it ----
        if builder in ("PbTiO3", "PbTiO3_DW"):
            ti = label_for(labels, "Ti")
            if ti:
                name_b = _find(d, _Entry("template", ti))
                spec_b, bright_b = _specific(d, name_b, ti)
                lost = spec_b is None or (not bright_b) or spec_b < spec_min
                rows.append(_row("Ti_binary_loses", imprint + "binary Ti template loses "
                                 "specificity (Pb also bright)", key, spec_b, "<", spec_min,
                                 spec_b is not None and lost,
                                 f"{name_b}; target bright={bright_b}", species=ti))
                spec_g, bright_g = _specific(d, _find(d, _Entry("template", ti, **_kind(gauss))),
                                             ti)
                best = [(_get(d, _find(d, _Entry("template", ti, "gaussian", float(s))),
                              "specificity", ti), s) for s in sweep]
                best_txt = ", ".join(f"sigma {s}: {v:.3g}" for v, s in best if v is not None)
                row = _row("Ti_gaussian_restores", imprint + f"gaussian Ti template (sigma "
                           f"{sig} A) restores specificity", key, spec_g, ">=", spec_min,
                           spec_g is not None and bright_g and spec_g >= spec_min,
                           f"target bright={bright_g}; sweep: {best_txt}", species=ti)
                rows.append(_with_control(row, d, ti, tag=gauss, ratio_max=ratio_max))
            o = label_for([x for x in labels if x.split("+")[0] == "O"], "O")
            if o:
                name_o = _find(d, _Entry("template", o, **_kind(gauss)))
                spec_o, bright_o = _specific(d, name_o, o)
                row = _row("PTO_O_specific", imprint + "O columns (invisible in ADF) are "
                           "extracted specifically", key, spec_o, ">=", spec_min,
                           spec_o is not None and bright_o and spec_o >= spec_min,
                           f"{name_o}; target bright={bright_o}", species=o)
                rows.append(_with_control(row, d, o, tag=gauss, ratio_max=ratio_max))
        # ---- every structure: partial templates, eigen-image, controls ----
        part = d[(d["metric"] == "mask_similarity") & (d["family"] == "partial")
                 & (d["normalisation"] == "pcc") & (d["template_kind"] == "gaussian")
                 & np.isclose(d["sigma_A"].astype(float), gauss[1])]
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
                             meas >= th["mask_pcc_min"], detail, informative=not trivial,
                             role="check"))
        e = _get(d, "eigen", "image_similarity")
        if e is not None:
            rows.append(_row("adf_is_eigen", "virtual ADF image is close to the leading "
                             "eigen-image of C", key, e, ">=", th["eigen_pcc_min"],
                             e >= th["eigen_pcc_min"], "Pearson(eigen-image, ADF)",
                             role="check"))
        rows.extend(_control_rows(d, key, ratio_max, labels, (binary, gauss)))
    # ---- iCoM vs thickness on the light columns, against a <= 4 nm reference ----
    rows.extend(_icom_rows(m, th["icom_thick_nm"], config))
    return rows


def _icom_rows(m: pd.DataFrame, thick_nm: float, config) -> list[dict]:
    """Per (structure, dose) and light column type: iCoM CNR at the thickness nearest
    ``thick_nm`` over that at the thinnest thickness, which must be <= REFERENCE_THIN_NM (else
    uninformative); and the all-atom template image vs iCoM on the same columns there."""
    rows = []
    for (s, dose), d in m.groupby(["structure", "dose_key"], sort=True):
        ts = sorted(d["thickness_key"].unique())
        labels = [x for x in d.loc[d["metric"] == "cnr", "species"].unique() if x != "fake"]
        light = light_labels(labels)
        if not light:
            continue
        t_thin = ts[0]
        t_thick = min(ts, key=lambda t: abs(t - thick_nm))
        note = "" if abs(t_thick - thick_nm) < 10 else (
            f" (nearest available {t_thick:g} nm is far from {thick_nm:g} nm)")
        dth = d[d["thickness_key"] == t_thick]
        for sp in light:
            claim = (f"iCoM degrades with thickness on the {sp} columns: CNR at {t_thick:g} nm "
                     f"/ at a <= {REFERENCE_THIN_NM:g} nm reference")
            key = (str(s), str(dose), float(t_thick))
            thin = _get(d[d["thickness_key"] == t_thin], "icom", "cnr", sp)
            thick = _get(dth, "icom", "cnr", sp)
            if t_thin > REFERENCE_THIN_NM or t_thick == t_thin:
                why = (f"thinnest thickness {t_thin:g} nm > {REFERENCE_THIN_NM:g} nm: no "
                       f"reference before channelling (add a <= {REFERENCE_THIN_NM:g} nm "
                       "thickness to the config)" if t_thin > REFERENCE_THIN_NM
                       else "only one thickness")
                rows.append(_row("icom_degrades", claim, key, None, "<", 1.0, False, why,
                                 informative=False, role="comparison", species=sp))
            elif thin is not None and thick is not None:
                ok_ref = thin > 0
                rows.append(_row(
                    "icom_degrades", claim, key, thick / thin if ok_ref else None, "<", 1.0,
                    ok_ref and thick / thin < 1.0,
                    f"iCoM CNR({sp}) at {t_thin:g} nm {thin:.3g}, at {t_thick:g} nm "
                    f"{thick:.3g}{note}" + ("" if ok_ref else
                                            " - iCoM does not show the columns at the "
                                            "reference: uninformative"),
                    informative=ok_ref, role="comparison", species=sp))
            tm = _get(dth, _find(dth, _Entry("template", "all")), "cnr", sp)
            if tm is not None and thick is not None:
                rows.append(_row("template_beats_icom_thick", f"all-atom template image beats "
                                 f"iCoM on the light {sp} columns (CNR) at the thick end", key,
                                 tm - thick, ">", 0.0, tm > thick,
                                 f"template {tm:.3g}, iCoM {thick:.3g}{note}",
                                 role="comparison", species=sp))
    return rows
