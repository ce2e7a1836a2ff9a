"""The HTML report as a reader meets it: summary and a figure on the first screen (rendered in
headless Chromium at 1280 x 900), no horizontal scrolling, a table of contents, the smoke-scale
caveat, the optional evidence section, long tables collapsed.

The report is built from a tiny synthetic results set (figures, claims, metrics, evidence), not
from a workflow run. The Chromium checks skip when no Chromium binary is installed (Debian:
``apt-get install -y chromium``) unless ``TMASK_REQUIRE_CHROMIUM=1`` (CI), where they fail.
"""

from __future__ import annotations

import html as _html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tmask_validate.report import RunScale, build_report, run_scale, write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VIEWPORT = (1280, 900)
SMOKE_CFG = {"name": "smoke", "description": "tiny test run",
             "simulation": {"energy_keV": 200, "semiangle_mrad": 23.5, "sampling_A": 0.15,
                            "phonons": {"configurations": 2}},
             "structures": {"LFP": {"builder": "LiFePO4", "thicknesses_nm": [2, 4],
                                    "scan": {"step_A": 1.0}},
                            "PTO": {"builder": "PbTiO3", "thicknesses_nm": [2, 4],
                                    "scan": {"step_A": 1.0}}},
             "dose": {"doses_e_per_A2": [1e4, 1e5]}}
FULL_CFG = {**SMOKE_CFG, "name": "mine",
            "simulation": {**SMOKE_CFG["simulation"], "sampling_A": 0.05},
            "structures": {"LFP": {"builder": "LiFePO4", "thicknesses_nm": [40, 70],
                                   "scan": {"step_A": 0.25}}}}


def _png(path: Path, seed: int, shape=(350, 1200)):
    """A figure-sized PNG (rows x columns px) of smooth random structure."""
    rng = np.random.default_rng(seed)
    img = np.cumsum(rng.normal(size=shape), axis=1)
    plt.imsave(path, img, cmap="gray")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """A tiny results folder: 4 figures (one evidence pair), 156 claim rows, metrics,
    evidence table."""
    d = tmp_path_factory.mktemp("results")
    figs = d / "figures"
    figs.mkdir()
    manifest = []
    specs = [("fig3_species_LFP", "LFP: Atom-specific masks and images (Fig. 3)", True, "", ""),
             ("sweep_thickness_LFP", "LFP: Specificity and CNR vs thickness", True, "", ""),
             ("fig2_adf_LFP", "LFP: Virtual ADF and its PCC map (Fig. 2)", False, "", ""),
             ("evidence_insample_LFP", "LFP: Li image, in-sample", False, "evidence",
              "in-sample"),
             ("evidence_crossfit_LFP", "LFP: Li image, cross-fitted", False, "evidence",
              "cross-fitted")]
    for k, (fid, title, key, section, fit) in enumerate(specs):
        _png(figs / f"{fid}.png", k)
        manifest.append({"id": fid, "png": f"{fid}.png", "pdf": f"{fid}.pdf",
                         "caption": f"caption of {fid}", "title": title,
                         "look": f"what to see in {fid}", "dataset": "LFP/noiseless/4.0 nm",
                         "structure": "LFP", "key": key, "section": section, "fit": fit})
    (figs / "figures.json").write_text(json.dumps(manifest))
    rows = []
    for c in range(13):
        for i in range(12):
            st = ["pass", "fail", "uninformative"][(c + i) % 3] if c % 4 else "pass"
            rows.append({"claim_id": f"claim_{c}", "claim": f"claim number {c} holds",
                         "dataset": f"LFP/d{i}/2 nm", "structure": "LFP", "dose_key": f"d{i}",
                         "thickness_nm": 2.0, "measured": 0.5 + 0.01 * i,
                         "comparison": ">=", "threshold": 0.8, "passed": st == "pass",
                         "detail": "a long detail " * 8, "status": st})
    pd.DataFrame(rows).to_csv(d / "claims.csv", index=False)
    met = []
    for t in (2.0, 4.0):
        for sp in ("Li", "Fe"):
            met.append({"structure": "LFP", "dose_key": "noiseless", "thickness_nm": t,
                        "name": f"tm_pcc_binary_{sp}", "metric": "specificity", "species": sp,
                        "value": 0.9, "family": "template", "normalisation": "pcc",
                        "template_kind": "binary"})
            met.append({"structure": "LFP", "dose_key": "noiseless", "thickness_nm": t,
                        "name": "tm_pcc_binary_all", "metric": "cnr", "species": sp,
                        "value": 3.0, "family": "template", "normalisation": "pcc",
                        "template_kind": "binary"})
    pd.DataFrame(met).to_csv(d / "metrics.csv", index=False)
    ev = pd.DataFrame({"structure": ["LFP"] * 4, "species": ["Li", "Li", "Fe", "Fe"],
                       "template": ["binary"] * 4, "thickness_nm": [2, 4, 2, 4],
                       "dose_e_per_A2": [1e5] * 4, "occupancy": [1.0] * 4,
                       "contrast_present": [0.3, 0.2, 0.9, 0.8],
                       "contrast_absent": [0.01, 0.02, 0.05, 0.04],
                       "evidence_z": [4.1, 2.0, 9.0, 8.5], "null_p": [1e-4, 0.04, 1e-9, 1e-8],
                       "verdict": ["evidence", "uninformative", "evidence", "evidence"]})
    ev.to_csv(d / "species_evidence.csv", index=False)
    return d


def _build(results: Path, *, evidence=True, config=SMOKE_CFG) -> str:
    return build_report(results / "figures" / "figures.json", results / "claims.csv",
                        results / "metrics.csv", config=config,
                        evidence_csv=results / "species_evidence.csv" if evidence else None)


def _pos(text: str, needle: str) -> int:
    i = text.find(needle)
    assert i >= 0, needle
    return i


# ---- structure of the page (no browser needed) -----------------------------------------------
def test_summary_evidence_figures_then_collapsed_tables(results):
    text = _build(results)
    order = [_pos(text, f"<section id='{s}'>") for s in
             ("summary", "evidence", "key-figures", "figures", "claim-checks", "metrics",
              "definitions")]
    assert order == sorted(order)
    # table of contents links every section
    toc = text[_pos(text, "<nav class='toc'"):_pos(text, "</nav>")]
    for sid in re.findall(r"<section id='([^']+)'>", text):
        assert f"href='#{sid}'" in toc
    # the 156 checks are collapsed; the summary has one row per claim (13) with counts
    checks = text[_pos(text, "<section id='claim-checks'>"):_pos(text, "<section id='metrics'>")]
    assert "<details>" in checks and checks.count("<tr") == 156 + 1
    summary = text[_pos(text, "<section id='summary'>"):_pos(text, "<section id='evidence'>")]
    assert summary.count("<tr") <= 13 + 1 + 8
    assert "claim number 0 holds" in summary and "holds on all" in summary
    assert "fails on 4 of 12" in summary
    # human headings from the manifest, not file stems; captions say what to look at
    assert "<h3>LFP: Virtual ADF and its PCC map (Fig. 2)</h3>" in text
    assert "<h3>fig2_adf_LFP</h3>" not in text
    assert "What to look at:</b> what to see in fig2_adf_LFP" in text
    # self-contained: every image is embedded
    srcs = re.findall(r"src='([^']*)'", text)
    assert len(srcs) == 5 and all(s.startswith("data:image/png;base64,") for s in srcs)


def test_evidence_section_leads_with_cross_fitted_images(results):
    text = _build(results)
    ev = text[_pos(text, "<section id='evidence'>"):_pos(text, "<section id='key-figures'>")]
    assert "evidence_z" in ev and "verdict" in ev
    assert "<td class='pass'>" in ev.replace('"', "'") or "class='pass'" in ev.replace('"', "'")
    # the lead figure (in the summary) is the cross-fitted evidence image; in-sample follows
    lead = text[_pos(text, "<section id='summary'>"):_pos(text, "<section id='evidence'>")]
    assert "cross-fitted" in lead and "id='fig-evidence_crossfit_LFP'" in lead
    assert "id='fig-evidence_insample_LFP'" in ev


def test_no_evidence_no_section(results):
    text = _build(results, evidence=False)
    assert "<section id='evidence'>" in text  # evidence figures alone still make the section
    nofig = results / "figures_noev"
    nofig.mkdir(exist_ok=True)
    man = [f for f in json.loads((results / "figures" / "figures.json").read_text())
           if f["section"] != "evidence"]
    for f in man:
        shutil.copy(results / "figures" / f["png"], nofig / f["png"])
    (nofig / "figures.json").write_text(json.dumps(man))
    text = build_report(nofig / "figures.json", results / "claims.csv",
                        results / "metrics.csv", config=SMOKE_CFG)
    assert "<section id='evidence'>" not in text and "href='#evidence'" not in text
    # the lead figure is then the first key figure
    lead = text[_pos(text, "<section id='summary'>"):_pos(text, "<section id='key-figures'>")]
    assert "id='fig-fig3_species_LFP'" in lead


def test_evidence_table_with_missing_columns_is_one_clear_error(results, tmp_path):
    bad = tmp_path / "ev.csv"
    pd.read_csv(results / "species_evidence.csv").drop(columns=["null_p"]).to_csv(bad)
    with pytest.raises(ValueError, match=r"lacks columns \['null_p'\]"):
        build_report(results / "figures" / "figures.json", results / "claims.csv",
                     results / "metrics.csv", evidence_csv=bad)


def test_smoke_caveat_from_the_config(results):
    assert "id='smoke-caveat'" in _build(results)
    assert "tests the machinery, not the physics" in _build(results)
    assert "id='smoke-caveat'" not in _build(results, config=FULL_CFG)
    # an explicit scale wins
    assert "id='smoke-caveat'" in build_report(
        results / "figures" / "figures.json", results / "claims.csv", results / "metrics.csv",
        config=FULL_CFG, scale=RunScale(True, ("forced",)))


def test_run_scale_of_the_shipped_configs():
    from tmask_validate.config import load_config

    smoke = run_scale(load_config(ROOT / "config" / "smoke.yaml"))
    assert smoke.smoke and any("smoke config" in r for r in smoke.reasons)
    assert any("nm" in r for r in smoke.reasons)  # thickness is a reason on its own
    for name in ("default", "paper"):
        assert not run_scale(load_config(ROOT / "config" / f"{name}.yaml")).smoke
    renamed = {**SMOKE_CFG, "name": "tiny"}  # not named smoke, still smoke-scale settings
    assert run_scale(renamed).smoke
    assert not run_scale(None).smoke


def test_cli_report_with_evidence_writes_atomically(results, tmp_path):
    import sys

    out = tmp_path / "rep" / "report.html"
    cfg = tmp_path / "smoke.yaml"
    shutil.copy(ROOT / "config" / "smoke.yaml", cfg)
    cli = Path(sys.executable).with_name("tmask-validate")
    res = subprocess.run([str(cli), "report", "--config", str(cfg), "--figures",
                          str(results / "figures" / "figures.json"), "--claims",
                          str(results / "claims.csv"), "--metrics", str(results / "metrics.csv"),
                          "--evidence", str(results / "species_evidence.csv"), "--out",
                          str(out)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    text = out.read_text()
    assert "<section id='evidence'>" in text and "id='smoke-caveat'" in text
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]


def test_write_report_leaves_nothing_on_failure(tmp_path, monkeypatch):
    out = tmp_path / "report.html"
    out.write_text("old")

    def boom(self, text, *a, **k):  # half the text reaches the disc, then the disc is full
        with open(self, "w") as fh:
            fh.write(text[: len(text) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", boom)
    with pytest.raises(OSError):
        write_report(out, "new")
    monkeypatch.undo()
    assert out.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


# ---- rendered in headless Chromium -----------------------------------------------------------
def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "chromium-headless-shell", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


#: writes the layout of the page into the DOM (read back with --dump-dom)
_PROBE = """<script>
window.addEventListener('load', function () {
  function box(el) { if (!el) return null; var r = el.getBoundingClientRect();
    return {top: r.top, bottom: r.bottom, left: r.left, right: r.right, height: r.height,
            width: r.width}; }
  var img = document.querySelector('figure img');
  var out = {innerWidth: window.innerWidth, innerHeight: window.innerHeight,
    scrollWidth: document.documentElement.scrollWidth,
    summary: box(document.getElementById('summary')),
    claims: box(document.querySelector('#summary table:not(.run)')),
    caveat: box(document.getElementById('smoke-caveat')),
    toc: box(document.getElementById('toc')),
    figure: box(img), figureNatural: img ? [img.naturalWidth, img.naturalHeight] : null,
    h1: box(document.querySelector('h1'))};
  var pre = document.createElement('pre'); pre.id = 'layout-probe';
  pre.textContent = JSON.stringify(out); document.body.appendChild(pre);
});
</script>"""


def _render(chromium: str, html_path: Path, tmp: Path, *, screenshot: Path | None = None):
    base = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--disable-extensions", f"--user-data-dir={tmp / 'profile'}",
            f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}", "--virtual-time-budget=5000",
            "--run-all-compositor-stages-before-draw"]
    probe = tmp / "probe.html"
    probe.write_text(html_path.read_text(encoding="utf-8").replace("</body>",
                                                                   _PROBE + "</body>"),
                     encoding="utf-8")
    res = subprocess.run([*base, "--dump-dom", probe.as_uri()], capture_output=True,
                         text=True, timeout=90)
    m = re.search(r'<pre id="layout-probe">(.*?)</pre>', res.stdout, re.S)
    assert m, f"no layout probe in Chromium's DOM (rc {res.returncode}): {res.stderr[-800:]}"
    layout = json.loads(_html.unescape(m.group(1)))
    if screenshot is not None:
        subprocess.run([*base, f"--screenshot={screenshot}", html_path.as_uri()],
                       capture_output=True, timeout=90)
    return layout


@pytest.fixture(scope="module")
def chromium():
    path = _chromium()
    if path is None:
        msg = ("no Chromium binary on PATH (chromium, chromium-browser, chromium-headless-shell, "
               "google-chrome); install it with `apt-get install -y chromium` to render the "
               "report")
        if os.environ.get("TMASK_REQUIRE_CHROMIUM") == "1":
            pytest.fail(msg + " [TMASK_REQUIRE_CHROMIUM=1]")
        pytest.skip(msg)
    return path


def test_first_screen_shows_summary_and_a_figure(results, chromium, tmp_path):
    page = write_report(tmp_path / "report.html", _build(results))
    shot = tmp_path / "first_screen.png"
    lay = _render(chromium, page, tmp_path, screenshot=shot)
    fold = lay["innerHeight"]
    assert abs(lay["innerWidth"] - VIEWPORT[0]) < 40, lay
    # no horizontal scrolling at a normal window width
    assert lay["scrollWidth"] <= lay["innerWidth"], lay
    # the caveat, the summary with the claims table and a decoded figure start on screen one
    assert 0 <= lay["caveat"]["top"] < fold
    assert 0 <= lay["summary"]["top"] < fold / 2
    assert lay["claims"]["top"] < fold
    assert lay["figure"] is not None and lay["figureNatural"][0] > 0, lay
    assert 0 <= lay["figure"]["top"] < fold - 100, lay
    assert lay["figure"]["height"] > 150 and lay["figure"]["right"] <= lay["innerWidth"]
    assert shot.is_file() and shot.stat().st_size > 10_000
    dest = os.environ.get("TMASK_REPORT_SCREENSHOT")
    if dest:  # for looking at it: TMASK_REPORT_SCREENSHOT=/tmp/shot.png pytest ...
        shutil.copy(shot, dest)


def test_first_screen_without_evidence_or_config(results, chromium, tmp_path):
    """No config, no evidence: the lead figure is the first key figure, still on screen."""
    text = build_report(results / "figures" / "figures.json", results / "claims.csv",
                        results / "metrics.csv")
    page = write_report(tmp_path / "report.html", text)
    lay = _render(chromium, page, tmp_path)
    assert lay["caveat"] is None
    assert lay["scrollWidth"] <= lay["innerWidth"], lay
    assert 0 <= lay["figure"]["top"] < lay["innerHeight"] - 100, lay
