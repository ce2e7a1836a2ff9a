"""The species-evidence figure: held-out (cross-fitted) images beside the in-sample "template
imprint", and evidence_z against thickness and occupancy (matplotlib only)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd


def _scale_bar(ax, step_A: float, shape, length_A: float = 5.0) -> None:
    px = length_A / step_A
    y = shape[0] - 3
    import matplotlib.patheffects as pe

    halo = [pe.withStroke(linewidth=3, foreground="black")]
    ax.plot([2, 2 + px], [y, y], color="white", lw=3, solid_capstyle="butt", path_effects=halo)
    ax.text(2 + px / 2, y - 1.5, f"{length_A:g} Å", color="white", ha="center", va="bottom",
            fontsize=7, path_effects=halo)


def _z_ticks(lo: float, hi: float) -> list[float]:
    """Labelled ticks for a symlog z axis (linear within +-3) spanning ``lo``..``hi``.

    Round linear steps when the span is short (the common case: values near the +-3
    threshold, where the axis is linear), else 0, +-3 and the 1-3-10 steps beyond.
    """
    if hi - lo <= 12:
        from matplotlib.ticker import MaxNLocator

        vals = MaxNLocator(nbins=7, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi)
        return [float(t) for t in vals if lo - 1e-9 <= t <= hi + 1e-9]
    steps = [0.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0]
    return sorted({t for v in steps for t in (v, -v) if lo <= t <= hi})


def _zaxis(ax) -> None:
    """Symmetric-log z axis (linear within +-3) with plain tick labels.

    Call after everything is drawn on ``ax`` (data and the threshold line), so that the ticks
    cover the final limits.
    """
    from matplotlib.ticker import FixedFormatter, FixedLocator, NullLocator

    ax.set_yscale("symlog", linthresh=3)
    lo, hi = ax.get_ylim()
    ticks = _z_ticks(lo, hi)
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(FixedFormatter([f"{t:g}" for t in ticks]))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_ylim(lo, hi)
    ax.grid(True, axis="y", lw=0.3, alpha=0.5)


def _pick_images(table: pd.DataFrame, images: Mapping[str, np.ndarray]):
    """Images of the first crystal comparison (thinnest thickness, highest dose)."""
    rows = table[(table["occupancy"] == 1.0)].sort_values(
        ["structure", "thickness_nm", "dose_e_per_A2"], ascending=[True, True, False])
    for _, r in rows.iterrows():
        base = (f"{r['structure']}/{r['thickness_nm']:g}/{r['dose_e_per_A2']:g}")
        keys = [f"{base}/{v}/{r['species']}/{r['template']}/{m}"
                for v in (r["present"], r["absent"]) for m in ("crossfit", "insample")]
        if all(k in images for k in keys):
            step = images.get(f"{r['structure']}/step_A")
            return r, [images[k] for k in keys], (float(np.min(step)) if step is not None
                                                   else None)
    return None, [], None


def evidence_figure(table: pd.DataFrame, images: Mapping[str, np.ndarray], out: str | Path, *,
                    dpi: int = 110) -> Path:
    """Write the evidence figure (PNG) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    row, imgs, step = _pick_images(table, images)
    # the legends go below the two lower panels (inside, they covered data at paper scale)
    fig = plt.figure(figsize=(12, 7.6))
    gs = fig.add_gridspec(2, 4, height_ratios=[1, 1.15], hspace=0.35, wspace=0.35,
                          left=0.06, right=0.97, top=0.91, bottom=0.2)
    titles = ["held-out (cross-fitted)\nspecies present", "in-sample imprint\nspecies present",
              "held-out (cross-fitted)\nspecies removed", "in-sample imprint\nspecies removed"]
    for i in range(4):
        ax = fig.add_subplot(gs[0, i])
        if imgs:
            im = imgs[i]
            lo, hi = np.percentile(im, [2, 98])
            h = ax.imshow(im, cmap="magma", vmin=lo, vmax=hi, interpolation="nearest")
            fig.colorbar(h, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
            if step:
                _scale_bar(ax, step, im.shape)
        ax.set_title(titles[i], fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    if row is not None:
        fig.suptitle(f"{row['structure']}: {row['species']} template ({row['template']}), "
                     f"{row['thickness_nm']:g} nm, {row['dose_e_per_A2']:g} e/Å² — in-sample "
                     "images reproduce any template; only the held-out contrast is evidence",
                     fontsize=9)
    ax1 = fig.add_subplot(gs[1, :2])
    crystal = table[table["occupancy"] == 1.0]
    doses = sorted(table["dose_e_per_A2"].unique())
    styles = dict(zip(doses, ["o:", "s--", "^-", "d-."] * 4, strict=False))
    groups = list(crystal.groupby(["structure", "species", "template"]))
    colours = plt.get_cmap("tab10")
    for gi, ((s, sp, kind), gg) in enumerate(groups):
        for dose, g in gg.groupby("dose_e_per_A2"):
            g = g.sort_values("thickness_nm")
            ax1.plot(g["thickness_nm"], g["evidence_z"], styles[dose], ms=4,
                     color=colours(gi % 10),
                     label=f"{s.split('_')[0]} {sp} ({kind}), {dose:g} e/Å²")
    thr = table.attrs.get("z_min", 3.0)
    ax1.axhline(thr, color="k", ls="--", lw=0.8)
    _zaxis(ax1)
    ax1.set_xlabel("thickness (nm)")
    ax1.set_ylabel("evidence_z = (present − removed) / SE")
    ax1.set_title("species vs its removed control, held-out cells", fontsize=9)
    ax1.legend(fontsize=6, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.14),
               frameon=False)
    ax2 = fig.add_subplot(gs[1, 2:])
    occ = table[table["species"].isin(table.loc[table["occupancy"] < 1, "species"].unique())]
    thick = sorted(occ["thickness_nm"].unique())
    for (_s, sp, _kind, dose, t), g in occ.groupby(["structure", "species", "template",
                                                  "dose_e_per_A2", "thickness_nm"]):
        g = g.sort_values("occupancy")
        ax2.plot(g["occupancy"], g["evidence_z"], styles[dose], ms=4,
                 color=colours(thick.index(t) % 10), label=f"{sp} {t:g} nm, {dose:g} e/Å²")
    ax2.axhline(thr, color="k", ls="--", lw=0.8)
    _zaxis(ax2)
    ax2.set_xlabel("occupancy x")
    ax2.set_ylabel("evidence_z vs x = 0")
    ax2.set_title("occupancy series (dashed: z threshold)", fontsize=9)
    ax2.legend(fontsize=6, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.14),
               frameon=False)
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(out)
    return out
