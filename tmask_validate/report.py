"""Self-contained HTML report of a workflow run (figures embedded as base64 PNG).

Order, so that a microscopist reads the answer first: a caveat when the run is smoke-scale
(:func:`run_scale`), the **summary** (what was run; which claims pass, fail or are
uninformative, one row per claim) beside the lead figure, the optional **evidence** table
(held-out images against species-absent controls, ``results/species_evidence.csv``), the key
figures, the other figures, then the long tables (every claim check, the metrics summary) and
the metric definitions, collapsed (``<details>``). A table of contents links every section;
everything fits a 1280 px window (wide tables scroll inside their box).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["RunScale", "run_scale", "build_report", "write_report", "summary_table",
           "claims_overview", "EVIDENCE_COLUMNS"]

#: columns of ``results/species_evidence.csv`` (issue 9) the evidence section reads
EVIDENCE_COLUMNS = ("structure", "species", "template", "thickness_nm", "dose_e_per_A2",
                    "occupancy", "contrast_present", "contrast_absent", "evidence_z", "null_p",
                    "verdict")

#: a run is smoke-scale below these (the paper's samples are 44-72.5 nm thick, scanned at
#: ~0.2-0.4 Å steps with ~0.05-0.1 Å sampling)
SMOKE_MAX_THICKNESS_NM = 10.0
SMOKE_MIN_SAMPLING_A = 0.12
SMOKE_MIN_STEP_A = 0.8

_CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1240px;margin:0 auto;
 padding:0 16px 2em;color:#222;line-height:1.4;font-size:15px}
header{padding:10px 0 4px;border-bottom:1px solid #ddd}
h1{font-size:22px;margin:0 0 2px} h2{font-size:19px;margin:1.2em 0 .4em;
 border-bottom:1px solid #eee} h3{font-size:16px;margin:1em 0 .3em}
.sub{color:#555;font-size:13px;margin:0}
nav.toc{font-size:13px;margin:4px 0 0} nav.toc a{margin-right:1em;white-space:nowrap}
.caveat{background:#fff4d6;border:1px solid #e0b84c;border-radius:4px;padding:6px 10px;
 margin:8px 0;font-size:14px}
.grid{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1.15fr);gap:18px;
 align-items:start}
@media (max-width:1000px){.grid{grid-template-columns:minmax(0,1fr)}}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-size:13px;margin:.3em 0}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top}
th{background:#f3f3f3} td.num{text-align:right;font-variant-numeric:tabular-nums}
.pass{background:#d8f5d8} .fail{background:#f8d0d0} .uninformative{background:#e4e4e4}
.run td:first-child{white-space:nowrap;color:#555} td.verdict{white-space:nowrap}
figure{margin:.6em 0 1.4em} figure img{max-width:100%;max-height:82vh;height:auto;
 display:block} figcaption{font-size:13px;color:#333;max-width:75em}
figcaption .look{display:block;margin-top:2px}
figcaption .meta{color:#777;font-style:italic}
details{margin:.4em 0} summary{cursor:pointer;font-weight:600}
pre{white-space:pre-wrap;font-size:12px;background:#f6f6f6;padding:.5em}
"""


# ----------------------------------------------------------------------------------------------
# run scale
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunScale:
    """Whether a run is smoke-scale (tests the machinery, not the physics), and why."""

    smoke: bool
    reasons: tuple[str, ...] = field(default_factory=tuple)


def run_scale(config: Mapping[str, Any] | None) -> RunScale:
    """Classify a validated config: smoke-scale when it is the smoke config (``name: smoke``)
    or when its settings cannot resolve the physics (every thickness below
    :data:`SMOKE_MAX_THICKNESS_NM`, sampling coarser than :data:`SMOKE_MIN_SAMPLING_A` or scan
    steps of :data:`SMOKE_MIN_STEP_A` or more). ``None`` (no config) is not smoke."""
    if not config:
        return RunScale(False)
    reasons: list[str] = []
    if str(config.get("name", "")) == "smoke":
        reasons.append("the config is the smoke config")
    structs = config.get("structures") or {}
    thick = [float(t) for s in structs.values() for t in (s.get("thicknesses_nm") or [])]
    if thick and max(thick) < SMOKE_MAX_THICKNESS_NM:
        reasons.append(f"thicknesses {min(thick):g}-{max(thick):g} nm (the paper's samples are "
                       "44-72.5 nm)")
    sampling = (config.get("simulation") or {}).get("sampling_A")
    if isinstance(sampling, int | float) and sampling > SMOKE_MIN_SAMPLING_A:
        reasons.append(f"{sampling:g} Å real-space sampling")
    steps = []
    for s in structs.values():
        st = (s.get("scan") or {}).get("step_A")
        if st is not None:
            steps.extend(np.atleast_1d(np.asarray(st, float)).tolist())
    if steps and min(steps) >= SMOKE_MIN_STEP_A:
        reasons.append(f"{min(steps):g} Å scan steps")
    return RunScale(bool(reasons), tuple(reasons))


# ----------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------
def _fmt(v) -> str:
    if isinstance(v, bool | np.bool_):
        return "yes" if v else "no"
    if isinstance(v, float | np.floating):
        return "" if not np.isfinite(v) else f"{v:.3g}"
    return str(v)


def _table(df: pd.DataFrame, *, row_class=None, cell_class=None) -> str:
    """HTML table in a horizontally scrolling box; ``row_class(row)`` / ``cell_class(col,
    row)`` give CSS classes."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    rows = []
    for _, r in df.iterrows():
        rc = f' class="{row_class(r)}"' if row_class else ""
        cells = []
        for c in df.columns:
            v = r[c]
            cls = [cell_class(c, r)] if cell_class else []
            if isinstance(v, int | float | np.integer | np.floating) and not isinstance(
                    v, bool | np.bool_):
                cls.append("num")
            cl = f' class="{" ".join(x for x in cls if x)}"' if any(cls) else ""
            cells.append(f"<td{cl}>{html.escape(_fmt(v))}</td>")
        rows.append(f"<tr{rc}>{''.join(cells)}</tr>")
    return (f"<div class='scroll'><table><tr>{head}</tr>{''.join(rows)}</table></div>")


def _status(claims: pd.DataFrame) -> pd.Series:
    if "status" in claims:
        st = claims["status"].fillna("").astype(str)
    else:
        st = pd.Series("", index=claims.index)
    passed = claims["passed"].astype(str).str.lower().eq("true")
    return st.where(st != "", np.where(passed, "pass", "fail"))


def claims_overview(claims: pd.DataFrame) -> pd.DataFrame:
    """One row per claim: how many datasets it passes, fails and is uninformative on.

    Columns ``claim``, ``pass``, ``fail``, ``uninformative``, ``datasets`` and ``verdict``
    ("holds on all", "fails on k of n", "uninformative on all", "mixed: ...")."""
    if claims.empty:
        return pd.DataFrame(columns=["claim", "pass", "fail", "uninformative", "datasets",
                                     "verdict"])
    c = claims.assign(_st=_status(claims))
    rows = []
    for _, g in c.groupby("claim_id", sort=False):
        n = {k: int((g["_st"] == k).sum()) for k in ("pass", "fail", "uninformative")}
        tot = len(g)
        if n["pass"] == tot:
            verdict = "holds on all"
        elif n["uninformative"] == tot:
            verdict = "uninformative on all"
        elif n["fail"] == tot:
            verdict = "fails on all"
        elif n["fail"]:
            verdict = f"fails on {n['fail']} of {tot}"
        else:
            verdict = f"holds on {n['pass']} of {tot} (rest uninformative)"
        rows.append({"claim": str(g["claim"].iloc[0]), **n, "datasets": tot,
                     "verdict": verdict})
    return pd.DataFrame(rows)


def _verdict_class(v: str) -> str:
    if v.startswith("holds on all"):
        return "pass"
    if v.startswith("fails") or v.startswith("mixed"):
        return "fail"
    if v.startswith("uninformative"):
        return "uninformative"
    return ""


def summary_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per dataset: specificity of each binary PCC template, and lightest-species CNR of the
    all-atom template, best ABF, ABF and iCoM."""
    if metrics.empty:
        return pd.DataFrame()
    m = metrics
    keys = ["structure", "dose_key", "thickness_nm"]
    spec = m[(m["family"] == "template") & (m["normalisation"] == "pcc")
             & (m["template_kind"] == "binary") & (m["metric"] == "specificity")]
    a = spec.pivot_table(index=keys, columns="species", values="value", aggfunc="first")
    a.columns = [f"spec {c}" for c in a.columns]
    rows = []
    for key, d in m[m["metric"] == "cnr"].groupby(keys):
        labels = [x for x in d["species"].unique() if x != "fake"]
        light = next((L for L in ("Li", "O") if L in labels), labels[0] if labels else "")
        rec = dict(zip(keys, key, strict=True))
        rec["light"] = light
        for name in ("tm_pcc_binary_all", "abf_best", "abf", "icom"):
            v = d[(d["name"] == name) & (d["species"] == light)]["value"]
            rec[f"CNR {name}"] = float(v.iloc[0]) if len(v) else float("nan")
        rows.append(rec)
    b = pd.DataFrame(rows).set_index(keys)
    return a.join(b, how="outer").reset_index()


def _run_rows(config: Mapping[str, Any] | None, metrics: pd.DataFrame,
              claims: pd.DataFrame) -> list[tuple[str, str]]:
    """(label, value) lines of "what was run": from the config where given, else from the
    tables."""
    rows: list[tuple[str, str]] = []
    cfg = config or {}
    if cfg.get("name"):
        rows.append(("config", str(cfg["name"])))
    structs = cfg.get("structures") or {}
    src = metrics if len(metrics) else claims
    if structs:
        parts = []
        for name, s in structs.items():
            th = ", ".join(f"{float(t):g}" for t in s.get("thicknesses_nm") or [])
            step = (s.get("scan") or {}).get("step_A")
            st = f", {step} Å steps" if step is not None else ""
            parts.append(f"{name} ({s.get('builder', '?')}; {th} nm{st})")
        rows.append(("structures", "; ".join(parts)))
    elif len(src) and "structure" in src:
        for s, g in src.groupby("structure", sort=True):
            th = sorted(pd.to_numeric(g["thickness_nm"], errors="coerce").dropna().unique())
            rows.append((str(s), "thickness " + ", ".join(f"{t:g}" for t in th) + " nm"))
    doses = (cfg.get("dose") or {}).get("doses_e_per_A2")
    if doses is not None:
        rows.append(("doses", "noiseless, " + ", ".join(f"{float(d):.0e}" for d in doses)
                     + " e⁻/Å²"))
    elif len(src) and "dose_key" in src:
        rows.append(("doses", ", ".join(sorted(map(str, src["dose_key"].unique())))))
    sim = cfg.get("simulation") or {}
    bits = []
    if "energy_keV" in sim:
        bits.append(f"{sim['energy_keV']} kV")
    if "semiangle_mrad" in sim:
        bits.append(f"{sim['semiangle_mrad']} mrad probe")
    if "sampling_A" in sim:
        bits.append(f"{sim['sampling_A']} Å sampling")
    ph = (sim.get("phonons") or {}).get("configurations")
    if ph is not None:
        bits.append(f"{ph} frozen-phonon configurations")
    if bits:
        rows.append(("simulation", ", ".join(bits)))
    return rows


# ----------------------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------------------
def _read_manifest(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    figs = json.loads(path.read_text())
    for f in figs:
        f["_png"] = path.parent / f["png"]
    return figs


def _figure_html(f: Mapping[str, Any], *, level: int = 3) -> str:
    png = Path(f["_png"])
    b64 = base64.b64encode(png.read_bytes()).decode()
    fid = html.escape(str(f["id"]))
    title = html.escape(str(f.get("title") or f["id"]))
    cap = html.escape(str(f.get("caption", "")))
    look = f.get("look")
    look_html = (f"<span class='look'><b>What to look at:</b> {html.escape(str(look))}</span>"
                 if look else "")
    meta = []
    if f.get("dataset"):
        meta.append(f"dataset {f['dataset']}")
    if f.get("fit"):
        meta.append(str(f["fit"]))
    if f.get("pdf"):
        meta.append(f"PDF: {f['pdf']}")
    meta_html = f" <span class='meta'>({html.escape('; '.join(meta))})</span>" if meta else ""
    return (f"<figure id='fig-{fid}'><h{level}>{title}</h{level}>"
            f"<img src='data:image/png;base64,{b64}' alt='{title}'>"
            f"<figcaption>{cap}{meta_html}{look_html}</figcaption></figure>")


def _fit_order(f: Mapping[str, Any]) -> int:
    fit = str(f.get("fit", ""))
    return 0 if fit == "cross-fitted" else 2 if fit == "in-sample" else 1


def _experiment_entries(paths: Sequence[str | Path]) -> list[dict]:
    out = []
    for p in paths:
        p = Path(p).resolve()
        out.append({"id": f"experiment-{p.stem}", "_png": p, "pdf": p.with_suffix(".pdf").name,
                    "title": f"Experimental dataset {p.stem}", "section": "experiment",
                    "fit": "in-sample",
                    "caption": "Virtual ABF with the fitted column sites, the template of the "
                               "last label, per-species PCC masks (top) and the images they "
                               "give (bottom), all-atom image.",
                    "look": "whether the sites sit on the columns of the ABF image; the "
                            "species images are in-sample and can resemble their templates "
                            "without evidence for the species.",
                    "dataset": p.stem})
    return out


def _evidence_figure_entries(paths: Sequence[str | Path]) -> list[dict]:
    out = []
    for p in paths:
        p = Path(p).resolve()
        out.append({"id": f"evidence-{p.stem}", "_png": p, "pdf": p.with_suffix(".pdf").name,
                    "title": "Species evidence: held-out images against species-removed controls",
                    "section": "evidence", "fit": "cross-fitted",
                    "caption": "Cross-fitted (held-out cell) template-mask images beside the "
                               "in-sample template imprint, for the species present and removed "
                               "(same seeds and phonon displacements), and evidence_z against "
                               "thickness and occupancy.",
                    "look": "whether the held-out image with the species present differs from "
                            "the one with it removed; an in-sample image that looks like its "
                            "template is no evidence.",
                    "dataset": p.stem})
    return out


# ----------------------------------------------------------------------------------------------
# evidence
# ----------------------------------------------------------------------------------------------
def _read_evidence(path: str | Path) -> pd.DataFrame:
    ev = pd.read_csv(path, keep_default_na=False, na_values=[""])
    missing = [c for c in EVIDENCE_COLUMNS if c not in ev.columns]
    if missing:
        raise ValueError(f"{path}: evidence table lacks columns {missing} (expected "
                         f"{list(EVIDENCE_COLUMNS)})")
    return ev


def _evidence_overview(ev: pd.DataFrame) -> pd.DataFrame:
    """One row per structure x species x template x occupancy: verdict counts over thickness
    and dose."""
    rows = []
    keys = [k for k in ("structure", "species", "template", "occupancy") if k in ev]
    for key, g in ev.groupby(keys, sort=False, dropna=False):
        counts = g["verdict"].astype(str).value_counts()
        z = pd.to_numeric(g["evidence_z"], errors="coerce")
        rows.append({**dict(zip(keys, key, strict=True)),
                     "verdicts": ", ".join(f"{k} {v}" for k, v in counts.items()),
                     "median z": float(np.nanmedian(z)) if z.notna().any() else np.nan,
                     "datasets": len(g)})
    return pd.DataFrame(rows)


def _verdict_cell(col, row) -> str:
    if col != "verdict":
        return ""
    v = str(row[col]).lower()
    if v in ("detected", "evidence", "present", "pass", "supported"):
        return "pass"
    if v in ("not detected", "no evidence", "absent", "fail", "not supported", "no_evidence"):
        return "fail"
    return "uninformative"


# ----------------------------------------------------------------------------------------------
# the page
# ----------------------------------------------------------------------------------------------
def build_report(
    figures_manifest: str | Path,
    claims_csv: str | Path,
    metrics_csv: str | Path,
    *,
    config: Mapping[str, Any] | None = None,
    extra_figures: Sequence[str | Path] | None = None,
    evidence_csv: str | Path | None = None,
    evidence_figures: Sequence[str | Path] | None = None,
    scale: RunScale | None = None,
) -> str:
    """Return the HTML text of the report.

    Parameters
    ----------
    figures_manifest : path
        ``figures.json`` of ``tmask-validate figures``: entries with ``id``, ``png``, ``pdf``,
        ``caption`` and optionally ``title``, ``look`` (what to look at), ``dataset``,
        ``structure``, ``key`` (shown among the key figures), ``section`` ("evidence" puts it
        in the evidence section) and ``fit`` ("cross-fitted" / "in-sample").
    claims_csv, metrics_csv : path
        ``results/claims.csv`` and ``results/metrics/metrics.csv``.
    config : mapping, optional
        The validated config (what was run).
    extra_figures : paths, optional
        Further PNGs (experiment overviews).
    evidence_csv : path, optional
        ``results/species_evidence.csv`` (columns :data:`EVIDENCE_COLUMNS`); when given, an
        "Evidence" section follows the summary.
    evidence_figures : paths, optional
        PNGs of the evidence stage (``results/evidence/species_evidence.png``), shown first in
        the evidence section.
    scale : RunScale, optional
        Default: :func:`run_scale` of ``config``; smoke-scale runs get a caveat at the top.
    """
    from tmask_validate import __version__
    from tmask_validate import metrics as metrics_mod

    scale = run_scale(config) if scale is None else scale
    figs = [f for f in _read_manifest(Path(figures_manifest)) if Path(f["_png"]).is_file()]
    figs += [f for f in _experiment_entries(extra_figures or []) if Path(f["_png"]).is_file()]
    figs += [f for f in _evidence_figure_entries(evidence_figures or [])
             if Path(f["_png"]).is_file()]
    claims = pd.read_csv(claims_csv, keep_default_na=False, na_values=[""])
    metrics = pd.read_csv(metrics_csv, keep_default_na=False, na_values=[""])
    evidence = _read_evidence(evidence_csv) if evidence_csv is not None else None
    name = str((config or {}).get("name", ""))

    ev_figs = sorted((f for f in figs if f.get("section") == "evidence"), key=_fit_order)
    rest = [f for f in figs if f.get("section") != "evidence"]
    key_figs = [f for f in rest if f.get("key")]
    if not key_figs and rest:
        key_figs = rest[:1]
    other_figs = [f for f in rest if f not in key_figs]
    lead = ev_figs[0] if ev_figs else (key_figs[0] if key_figs else None)

    sections = [("summary", "Summary")]
    if evidence is not None or ev_figs:
        sections.append(("evidence", "Evidence"))
    if [f for f in key_figs if f is not lead]:
        sections.append(("key-figures", "Key figures"))
    if other_figs:
        sections.append(("figures", "All other figures"))
    sections += [("claim-checks", "Every claim check"), ("metrics", "Metrics summary"),
                 ("definitions", "Metric definitions"), ("provenance", "Provenance")]

    title = "Template-mask validation report" + (f": {name}" if name else "")
    p = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
         f"<meta name='viewport' content='width=device-width,initial-scale=1'>"
         f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"]
    p.append(f"<header><h1>{html.escape(title)}</h1>")
    desc = str((config or {}).get("description", "") or "")
    if desc:
        p.append(f"<p class='sub'>{html.escape(desc)}</p>")
    p.append("<nav class='toc' id='toc'><b>Contents:</b> " + "".join(
        f"<a href='#{sid}'>{html.escape(txt)}</a>" for sid, txt in sections) + "</nav></header>")
    if scale.smoke:
        p.append("<div class='caveat' id='smoke-caveat'><b>Smoke-scale run: it tests the "
                 "machinery, not the physics.</b> The numbers and verdicts below come from "
                 "settings too coarse to say anything about template masks ("
                 + html.escape("; ".join(scale.reasons)) + "). Run the default or paper "
                 "config for results.</div>")

    # ---- summary (+ lead figure) ----
    ov = claims_overview(claims)
    st = _status(claims) if len(claims) else pd.Series(dtype=str)
    counts = {k: int((st == k).sum()) for k in ("pass", "fail", "uninformative")}
    p.append("<section id='summary'><h2>Summary</h2><div class='grid'><div>")
    p.append("<h3>What was run</h3><table class='run'>" + "".join(
        f"<tr><td>{html.escape(a)}</td><td>{html.escape(b)}</td></tr>"
        for a, b in _run_rows(config, metrics, claims)) + "</table>")
    p.append(f"<h3>Claims</h3><p>{len(ov)} claims checked on {len(claims)} claim x dataset "
             f"pairs: <span class='pass'>&nbsp;{counts['pass']} pass&nbsp;</span> "
             f"<span class='fail'>&nbsp;{counts['fail']} fail&nbsp;</span> "
             f"<span class='uninformative'>&nbsp;{counts['uninformative']} "
             "uninformative&nbsp;</span> (a check that its own control makes trivially true "
             "is uninformative, not a pass).</p>")
    if len(ov):
        shown = ov.rename(columns={"uninformative": "uninf.", "datasets": "of"})
        p.append(_table(shown, cell_class=lambda c, r: "verdict " + _verdict_class(
            str(r["verdict"])) if c == "verdict" else ""))
    p.append("<p class='sub'>Every check with its measured value and threshold: "
             "<a href='#claim-checks'>below</a>.</p></div><div>")
    if lead is not None:
        p.append(_figure_html(lead, level=3))
    p.append("</div></div></section>")

    # ---- evidence ----
    if evidence is not None or ev_figs:
        p.append("<section id='evidence'><h2>Evidence</h2><p>An image that looks like its "
                 "template is not evidence: a PCC mask reproduces almost any template "
                 "in-sample. Evidence is a held-out (cross-fitted) image that differs from the "
                 "same analysis of a control without the species, beyond what random-site "
                 "templates give (<code>evidence_z</code>, <code>null_p</code>).</p>")
        if evidence is not None and len(evidence):
            p.append(_table(_evidence_overview(evidence)))
            cols = [c for c in EVIDENCE_COLUMNS if c in evidence]
            full = _table(evidence[cols], cell_class=_verdict_cell)
            if len(evidence) > 12:
                p.append(f"<details><summary>All {len(evidence)} evidence rows</summary>"
                         f"{full}</details>")
            else:
                p.append(full)
        elif evidence is not None:
            p.append("<p>The evidence table is empty.</p>")
        for f in ev_figs:
            if f is not lead:
                p.append(_figure_html(f))
        p.append("</section>")

    # ---- figures ----
    if [f for f in key_figs if f is not lead]:
        p.append("<section id='key-figures'><h2>Key figures</h2>")
        p += [_figure_html(f) for f in key_figs if f is not lead]
        p.append("</section>")
    if other_figs:
        p.append("<section id='figures'><h2>All other figures</h2>")
        p += [_figure_html(f) for f in other_figs]
        p.append("</section>")

    # ---- long tables, collapsed ----
    p.append(f"<section id='claim-checks'><h2>Every claim check</h2><p>One row per claim and "
             f"dataset (structure / dose / thickness); thresholds come from "
             f"<code>analysis.claims</code> in the config; failing claims are reported as "
             f"they are.</p><details><summary>{len(claims)} checks</summary>")
    if len(claims):
        cols = [c for c in ("claim_id", "dataset", "measured", "comparison", "threshold",
                            "status", "detail") if c in claims]
        cc = claims.assign(status=_status(claims))[cols]
        p.append(_table(cc, cell_class=lambda c, r: str(r["status"]) if c == "status"
                        else ""))
    p.append("</details></section>")
    p.append("<section id='metrics'><h2>Metrics summary</h2><p>Specificity (bright) of the "
             "binary PCC template image of each column type, and CNR of the lightest column "
             "type in the all-atom template image, the best ABF of the radius sweep, the "
             "standard ABF (inverted) and iCoM. The full tidy table is "
             "<code>results/metrics/metrics.csv</code>.</p>")
    sm = summary_table(metrics)
    p.append(f"<details><summary>{len(sm)} datasets</summary>"
             + (_table(sm) if len(sm) else "") + "</details></section>")
    doc = (metrics_mod.__doc__ or "").split("Metric definitions", 1)[-1]
    p.append("<section id='definitions'><h2>Metric definitions</h2><details><summary>"
             "Definitions</summary><pre>" + html.escape(doc.strip()) + "</pre></details>"
             "</section>")
    now = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    p.append(f"<section id='provenance'><h2>Provenance</h2><p class='sub'>Generated {now} by "
             f"tmask_validate {html.escape(__version__)}"
             + (f" from config <code>{html.escape(name)}</code>" if name else "")
             + ".</p></section></body></html>")
    return "\n".join(p)


def write_report(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temporary file in the same folder, then
    rename)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out
