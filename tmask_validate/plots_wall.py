"""Fig. 4 of the paper for a domain-wall simulation store: the wall and the Ti–O flip, measured.

``python -m tmask_validate.plots_wall STORE --out DIR [--dose 1e5] [--window-A Y0 Y1 X0 X1]``
reads a PbTiO3_DW simulation store (e.g. of ``config/wall.yaml``), and writes

* ``fig4_wall.png``: virtual ADF and ABF images; cross-fitted O, Ti(+O) and Pb template-mask
  images whose masks come from a homogeneous window of domain 1 (outlined) applied to the whole
  field; the O mask; the measured Ti–O displacement arrows coloured by their wall-parallel
  component; that component against the signed distance from the wall, measured vs the
  structure's own values;
* ``displacements.csv`` (per Ti column: known and measured displacement, error in pm) and
  ``wall_summary.json`` (error statistics in pm, per-domain means, whether the sign flips).

The measurement is :mod:`tmask_validate.displacement`; this module only plots and writes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from tmask_validate import displacement as D


def wall_analysis(ds, *, thickness_index: int = -1, dose_e_per_A2: float | None = None,
                  noise_seed: int = 0, window_A=None) -> dict:
    """Images, window masks and displacements of one thickness of a domain-wall store."""
    from tmask_validate import core, noise
    from tmask_validate.simulate import store_calibration, store_sites

    cal = store_calibration(ds)
    data = np.asarray(ds.intensity[thickness_index].values, dtype=np.float32)
    if dose_e_per_A2 is not None:
        e = noise.electrons_per_probe(dose_e_per_A2, cal.step_A)
        data = noise.poisson_counts(data, e, seed=noise_seed, dose_e_per_A2=dose_e_per_A2,
                                    thickness_index=0).astype(np.float32)
    sites = store_sites(ds)
    ys, xs = ds.scan_y.values, ds.scan_x.values
    if window_A is None:  # the field's 8 x 8 Å corner on the y > x side (domain 1)
        window_A = (ys[-1] - 8.0 + 1e-6, ys[-1] + 1e-6, xs[0] - 1e-6, xs[0] + 8.0 - 1e-6)
    win = D.window_region(ys, xs, window_A[:2], window_A[2:])
    origin = (float(ys[0]), float(xs[0]))
    res = D.wall_masks_and_images(data, sites, step_A=cal.step_A, origin_A=origin, window=win)
    dets = {"ADF": (35.0, 64.0), "ABF": (11.0, 23.5)}
    masks = core.virtual_detector_masks(data.shape[2:], dets, calibration=cal)
    res["virtual"] = core.virtual_images(data, masks)
    cfg = json.loads(ds.attrs["config"])
    a = float(cfg["structures"][ds.attrs["structure"]].get("builder_options", {})
              .get("a_pc_A", 0.0)) or _a_pc(sites)
    res["displacements"] = D.measure_wall_displacements(
        res["images"]["Ti+O"], res["images"]["O"], sites, step_A=cal.step_A, origin_A=origin,
        cell_A=(a, a))
    # the same measurement on conventional images: Ti on ADF, O on inverted ABF
    res["displacements_adf_abf"] = D.measure_wall_displacements(
        res["virtual"]["ADF"], -res["virtual"]["ABF"], sites, step_A=cal.step_A,
        origin_A=origin, cell_A=(a, a))
    res.update(sites=sites, origin=origin, step=cal.step_A, shape=data.shape[:2],
               window_A=[float(v) for v in window_A], thickness_nm=float(
                   ds.thickness.values[thickness_index]), dose=dose_e_per_A2, a_pc_A=a)
    return res


def _a_pc(sites) -> float:
    """Pseudo-cubic parameter from the Pb sites (nearest-neighbour distance)."""
    from scipy.spatial import cKDTree

    pb = sites[sites["label"] == "Pb"][["y_A", "x_A"]].to_numpy()
    d, _ = cKDTree(pb).query(pb, k=2)
    return float(np.median(d[:, 1]))


def plot_wall_figure(res: dict, path: str | Path, *, dpi: int = 110) -> Path:
    """Save the Fig. 4 panel set of :func:`wall_analysis` (see the module docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    oy, ox = res["origin"]
    sy, sx = res["step"]
    ny, nx = res["shape"]
    ext = (ox - sx / 2, ox + (nx - 0.5) * sx, oy + (ny - 0.5) * sy, oy - sy / 2)
    disp = res["displacements"]
    m = disp["matched"]
    fig, axes = plt.subplots(2, 4, figsize=(19, 8.8), constrained_layout=True)
    panels = [("virtual ADF 35–64 mrad", res["virtual"]["ADF"]),
              ("virtual ABF 11–23.5 mrad (inverted)", -res["virtual"]["ABF"]),
              ("O mask image (cross-fitted)", res["images"]["O"]),
              ("Ti+O mask image (cross-fitted)", res["images"]["Ti+O"]),
              ("Pb mask image (cross-fitted)", res["images"]["Pb"])]
    wy0, wy1, wx0, wx1 = res["window_A"]
    ys = np.array([oy, oy + (ny - 1) * sy])
    for ax, (title, img) in zip(axes.ravel()[:5], panels, strict=True):
        im = ax.imshow(img, extent=ext, cmap="gray")
        ax.add_patch(Rectangle((wx0, wy0), wx1 - wx0, wy1 - wy0, fill=False, ec="tab:orange",
                               lw=1.5, label="mask window"))
        ax.plot(ys + 1.007, ys, "--", color="tab:cyan", lw=1, label="wall (y − x = −1.0 Å)")
        ax.set_xlim(ext[0], ext[1])
        ax.set_ylim(ext[2], ext[3])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("x (Å)")
        ax.set_ylabel("y (Å)")
        fig.colorbar(im, ax=ax, shrink=0.8, label="intensity (a.u.)")
    axes[0, 0].legend(loc="lower left", fontsize=7)
    sites = res["sites"]
    o = sites[sites["label"] == "O"]
    axes[0, 2].scatter(o["x_A"], o["y_A"], s=6, c="tab:red", marker="+", lw=0.6,
                       label="O columns (structure)")
    axes[0, 2].legend(loc="lower left", fontsize=7)
    # the O mask over the detector
    ax = axes[1, 1]
    mk = res["masks"]["O"]
    im = ax.imshow(mk, cmap="RdBu_r", vmin=-np.abs(mk).max(), vmax=np.abs(mk).max())
    ax.set_title("O mask (PCC) from the window", fontsize=10)
    ax.set_xlabel("kx (px)")
    ax.set_ylabel("ky (px)")
    fig.colorbar(im, ax=ax, shrink=0.8, label="PCC")
    # displacement arrows coloured by the wall-parallel component
    ax = axes[1, 2]
    ax.imshow(res["virtual"]["ADF"], extent=ext, cmap="gray", alpha=0.6)
    par, _ = D.wall_components(m["dy_meas_A"].to_numpy(), m["dx_meas_A"].to_numpy())
    scale = 10.0  # arrows 10x their length
    q = ax.quiver(m["x_A"], m["y_A"], scale * m["dx_meas_A"], scale * m["dy_meas_A"],
                  100 * par, cmap="coolwarm", angles="xy", scale_units="xy", scale=1,
                  width=0.008)
    ax.plot(ys + 1.007, ys, "--", color="tab:cyan", lw=1)
    ax.set_xlim(ext[0], ext[1])
    ax.set_ylim(ext[2], ext[3])
    ax.set_title("Ti − O-centre displacement ×10 (mask images)", fontsize=10)
    ax.set_xlabel("x (Å)")
    ax.set_ylabel("y (Å)")
    fig.colorbar(q, ax=ax, shrink=0.8, label="wall-parallel component (pm)")
    # parallel component vs signed distance from the wall
    ax = axes[1, 3]
    sign = np.where(m["domain"].to_numpy() == 1, 1.0, -1.0)
    dist = sign * m["wall_distance_A"].to_numpy()
    kpar, _ = D.wall_components(m["dy_A"].to_numpy(), m["dx_A"].to_numpy())
    ax.plot(dist, 100 * kpar, "o", mfc="none", color="k", label="structure")
    ax.plot(dist, 100 * par, "x", color="tab:red", label="measured (mask images)")
    if "displacements_adf_abf" in res:
        m2 = res["displacements_adf_abf"]["matched"]
        par2, _ = D.wall_components(m2["dy_meas_A"].to_numpy(), m2["dx_meas_A"].to_numpy())
        sign2 = np.where(m2["domain"].to_numpy() == 1, 1.0, -1.0)
        ax.plot(sign2 * m2["wall_distance_A"].to_numpy(), 100 * par2, "+", color="tab:blue",
                label="measured (ADF Ti, ABF O)")
    ax.axvline(0, color="tab:cyan", ls="--", lw=1)
    ax.axhline(0, color="0.6", lw=0.8)
    e = disp["err_pm"]
    ax.set_title(f"mask images: error median {e['median_pm']:.1f} pm, 90 % "
                 f"{e['p90_pm']:.1f} pm (n = {e['n']})", fontsize=10)
    ax.set_xlabel("signed distance from the wall (Å; + = domain 1)")
    ax.set_ylabel("wall-parallel Ti–O displacement (pm)")
    ax.legend(fontsize=8)
    dose = "noiseless" if res["dose"] is None else f"{res['dose']:.0e} e⁻/Å²"
    fig.suptitle(f"PbTiO3 90° domain wall, {res['thickness_nm']:.1f} nm, {dose}; masks from "
                 "the orange window applied to the whole field", fontsize=12)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    from tmask_validate.simulate import load_store

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store", help="PbTiO3_DW simulation store (zarr)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--dose", type=float, default=None, help="e-/Å² (Poisson noise); none")
    ap.add_argument("--seed", type=int, default=0, help="noise seed")
    ap.add_argument("--window-A", type=float, nargs=4, default=None,
                    metavar=("Y0", "Y1", "X0", "X1"), help="mask window (absolute Å)")
    args = ap.parse_args(argv)
    ds = load_store(args.store)
    res = wall_analysis(ds, dose_e_per_A2=args.dose, noise_seed=args.seed,
                        window_A=args.window_A)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "noiseless" if args.dose is None else f"dose{args.dose:.0e}"
    plot_wall_figure(res, out / f"fig4_wall_{tag}.png")
    d = res["displacements"]
    d["matched"].to_csv(out / f"displacements_{tag}.csv", index=False, float_format="%.5g")
    d2 = res["displacements_adf_abf"]
    summary = {"store": str(args.store), "thickness_nm": res["thickness_nm"],
               "dose_e_per_A2": args.dose, "window_A": res["window_A"],
               "error_pm": d["err_pm"],
               "flip_measured": d["flip"].to_dict(orient="records"),
               "flip_structure": d["flip_known"].to_dict(orient="records"),
               "adf_abf_error_pm": d2["err_pm"],
               "adf_abf_flip_measured": d2["flip"].to_dict(orient="records")}
    (out / f"wall_summary_{tag}.json").write_text(json.dumps(summary, indent=1, default=float))
    print("mask images:", json.dumps(summary["error_pm"]))
    print(d["flip"].to_string(index=False))
    print("ADF (Ti) + inverted ABF (O):", json.dumps(summary["adf_abf_error_pm"]))
    print(d2["flip"].to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
