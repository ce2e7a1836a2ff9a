"""Self-contained HTML report of a workflow run (figures embedded as base64 PNG).

Sections: run summary (config, versions), claims table (pass/fail), figures with captions, a
summary metrics table (specificity and CNR per dataset) and the metric definitions (quoted from
:mod:`tmask_validate.metrics`).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["build_report", "summary_table"]

_CSS = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:auto;padding:1em;color:#222}
table{border-collapse:collapse;font-size:12px;margin:0.5em 0}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}
tr.pass td.res{background:#d8f5d8} tr.fail td.res{background:#f8d0d0}
tr.na td.res{background:#e8e8e8}
figure{margin:1.5em 0;border-top:1px solid #ddd;padding-top:0.5em}
figure img{max-width:100%} figcaption{font-size:13px;color:#444}
pre{white-space:pre-wrap;font-size:12px;background:#f6f6f6;padding:0.5em}
"""


def _table(df: pd.DataFrame, *, classes=None) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    rows = []
    for _, r in df.iterrows():
        cls = ""
        if classes is not None:
            cls = f' class="{classes(r)}"'
        cells = []
        for c in df.columns:
            v = r[c]
            txt = f"{v:.3g}" if isinstance(v, float) else str(v)
            res = ' class="res"' if c == "passed" else ""
            cells.append(f"<td{res}>{html.escape(txt)}</td>")
        rows.append(f"<tr{cls}>{''.join(cells)}</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


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


def build_report(
    figures_manifest: str | Path,
    claims_csv: str | Path,
    metrics_csv: str | Path,
    *,
    config: Mapping[str, Any] | None = None,
    extra_figures: list[str | Path] | None = None,
) -> str:
    """Return the HTML text of the report (``extra_figures``: e.g. experiment overviews)."""
    from tmask_validate import metrics as metrics_mod

    figures_manifest = Path(figures_manifest)
    figs = json.loads(figures_manifest.read_text()) if figures_manifest.is_file() else []
    for p in extra_figures or []:
        p = Path(p).resolve()
        figs.append({"id": p.stem, "png": str(p), "pdf": str(p.with_suffix(".pdf").name),
                     "caption": "Experimental dataset: virtual ABF with the column sites, "
                                "template of the last label, per-species PCC masks (top) and "
                                "images (bottom), all-atom template.", "dataset": p.stem})
    claims = pd.read_csv(claims_csv, keep_default_na=False, na_values=[""])
    metrics = pd.read_csv(metrics_csv, keep_default_na=False, na_values=[""])
    name = (config or {}).get("name", "")
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>tmask_validate report "
             f"{html.escape(name)}</title><style>{_CSS}</style></head><body>"]
    parts.append(f"<h1>Template masks for 4D-STEM: validation report ({html.escape(name)})</h1>")
    parts.append(f"<p>Generated {_dt.datetime.now(_dt.UTC).isoformat(timespec='seconds')}. "
                 f"{html.escape(str((config or {}).get('description', '')))}</p>")
    n_pass = int(claims["passed"].astype(str).str.lower().eq("true").sum()) if len(claims) else 0
    parts.append(f"<h2>Claims</h2><p>{n_pass} of {len(claims)} claim checks pass. Each row is "
                 "one qualitative claim of the paper evaluated on one dataset (structure / dose "
                 "/ thickness); thresholds come from <code>analysis.claims</code> in the config. "
                 "Failing claims are reported as they are.</p>")
    if len(claims):
        by = (claims.assign(ok=claims["passed"].astype(str).str.lower().eq("true"))
              .groupby("claim_id", sort=False)
              .agg(claim=("claim", "first"), passed=("ok", "sum"), datasets=("ok", "size"))
              .reset_index())
        parts.append("<h3>Summary</h3>" + _table(by))
        parts.append("<h3>All checks</h3>" + _table(
            claims, classes=lambda r: (
                "pass" if str(r["passed"]).lower() == "true" else
                "na" if str(r.get("status", "")) == "uninformative" else "fail")))
    parts.append("<h2>Figures</h2>")
    for f in figs:
        png = figures_manifest.parent / f["png"]
        if not png.is_file():
            continue
        b64 = base64.b64encode(png.read_bytes()).decode()
        parts.append(f"<figure id='{html.escape(f['id'])}'><h3>{html.escape(f['id'])}</h3>"
                     f"<img src='data:image/png;base64,{b64}' alt='{html.escape(f['id'])}'>"
                     f"<figcaption>{html.escape(f['caption'])} "
                     f"<i>Dataset: {html.escape(f.get('dataset', ''))}; PDF: "
                     f"{html.escape(f['pdf'])}</i></figcaption></figure>")
    parts.append("<h2>Metrics summary</h2><p>Specificity (bright) of the binary PCC template "
                 "image of each column type, and CNR of the lightest column type in the "
                 "all-atom template image, the best ABF of the radius sweep, the standard ABF "
                 "(inverted) and iCoM. The full tidy table is <code>results/metrics/metrics.csv"
                 "</code> (NetCDF: metrics.nc).</p>")
    st = summary_table(metrics)
    if len(st):
        parts.append(_table(st))
    doc = (metrics_mod.__doc__ or "").split("Metric definitions", 1)[-1]
    parts.append("<h2>Metric definitions</h2><pre>" + html.escape(doc.strip()) + "</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)
