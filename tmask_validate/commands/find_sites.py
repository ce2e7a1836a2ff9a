"""``tmask-validate find-sites FILE --structure NAME --out sites.csv``: column sites of a scan.

Makes a virtual image (``--image adf|abf|bf``; detector radii from ``--inner-mrad/--outer-mrad``
or the analysis defaults), finds and refines its peaks, fits the lattice (the structure's
projected cell as the starting guess), and lays the structure's projected basis onto it, so the
CSV lists every column type (``label,y_A,x_A,composition,n_atoms`` + ``y_px,x_px,cell_i,cell_j,
visible``), including types invisible in that image. ABF/BF images are inverted (atoms dark).
The peaks are matched to ``--match-label`` (default: the heaviest column type); the crystal's
in-plane rotation is searched unless ``--lattice-rotation-deg`` gives it.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from tmask_validate.commands.inspect import add_data_arguments, load_from_arguments

_ELEMENTS = (
    "H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge As Se "
    "Br Kr Rb Sr Y Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe Cs Ba La Ce Pr Nd Pm Sm Eu Gd Tb "
    "Dy Ho Er Tm Yb Lu Hf Ta W Re Os Ir Pt Au Hg Tl Pb Bi Po At Rn Fr Ra Ac Th Pa U"
).split()


def column_z(composition: str) -> int:
    """Summed atomic number of a composition such as ``"Ti1O1"`` (unknown symbols count 0)."""
    import re

    return sum(
        (_ELEMENTS.index(sym) + 1 if sym in _ELEMENTS else 0) * int(n or 1)
        for sym, n in re.findall(r"([A-Z][a-z]?)(\d*)", str(composition))
    )


def register(subparsers) -> None:
    p = subparsers.add_parser("find-sites", help="column sites of an experimental scan -> CSV",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(p)
    p.add_argument("--structure", required=True, help="structure builder name (e.g. lifepo4)")
    p.add_argument("--image", choices=("adf", "abf", "bf"), default="adf")
    p.add_argument("--inner-mrad", type=float, default=None)
    p.add_argument("--outer-mrad", type=float, default=None)
    p.add_argument("--match-label", default=None,
                   help="column label the image peaks belong to (default: heaviest)")
    p.add_argument("--threshold", type=float, default=None,
                   help="absolute peak threshold on the (inverted for abf/bf) image")
    p.add_argument("--lattice-rotation-deg", type=float, default=None,
                   help="crystal rotation in the scan frame (cell x axis along (sin, cos) in "
                        "(y, x)); default: searched")
    p.add_argument("--config", default=None, help="config YAML (analysis.detectors_mrad)")
    p.add_argument("--out", required=True, help="output CSV")
    p.set_defaults(func=run)


def _detector(args, max_angle: float) -> tuple[float, float]:
    if args.inner_mrad is not None and args.outer_mrad is not None:
        inner, outer = args.inner_mrad, args.outer_mrad
    else:
        from tmask_validate.analysis import analysis_options
        from tmask_validate.config import load_config

        cfg = load_config(args.config) if args.config else None
        inner, outer = analysis_options(cfg["analysis"] if cfg else None)["detectors_mrad"][
            args.image]
        inner = args.inner_mrad if args.inner_mrad is not None else inner
        outer = args.outer_mrad if args.outer_mrad is not None else outer
    outer = min(float(outer), max_angle)
    if inner >= outer:
        raise ValueError(f"{args.image} detector {inner}-{outer} mrad lies outside the recorded "
                         f"angles (max {max_angle:.1f} mrad)")
    return float(inner), float(outer)


def run(args: argparse.Namespace) -> int:
    from tmask_validate import core, structures
    from tmask_validate.calibration import Calibration
    from tmask_validate.preprocess import disc_center, pixel_statistics
    from tmask_validate.sites import sites_from_image, write_sites_csv

    arr = load_from_arguments(args)
    if not arr.attrs.get("calibrated", False):
        raise ValueError("find-sites needs a calibration (--calibration YAML or flags): scan "
                         "step in Å and detector mrad/px")
    cal = Calibration.from_dict(json.loads(arr.attrs["calibration"]))
    center = cal.center_px
    if center is None:
        center = disc_center(pixel_statistics(arr)["mean"])
    ny, nx = arr.shape[2:]
    corners = np.array([[0, 0], [0, nx - 1], [ny - 1, 0], [ny - 1, nx - 1]], float)
    max_angle = float(np.max(np.hypot(*((corners - center) * cal.mrad_per_px).T)))
    inner, outer = _detector(args, max_angle)
    masks = core.virtual_detector_masks((ny, nx), {args.image: (inner, outer)},
                                        center_px=center, mrad_per_px=cal.mrad_per_px)
    image = np.asarray(core.virtual_images(arr.data, masks)[args.image], dtype=np.float64)

    table = structures.projected_columns(args.structure)
    cell = structures.projected_cell_A(structures.build(args.structure))
    match = args.match_label
    if match is None:
        comp = table.drop_duplicates("label").set_index("label")["composition"]
        match = max(comp.index, key=lambda lab: column_z(comp[lab]))
    sites, info = sites_from_image(image, table, cell, step_A=cal.step_A, match_label=match,
                                   invert=args.image != "adf", threshold=args.threshold,
                                   rotation_deg=args.lattice_rotation_deg)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    write_sites_csv(sites, tmp)
    tmp.replace(out)
    fit = info["fit"]
    counts = sites["label"].value_counts().to_dict()
    print(f"find-sites: {args.image} {inner:g}-{outer:g} mrad, {len(info['peaks_px'])} peaks "
          f"({match}), crystal rotation {info['rotation_deg']:.1f} deg, lattice rms "
          f"{fit['rms']:.3f} px, {fit['n_inliers']} inliers; "
          f"{len(sites)} sites {counts} -> {out}")
    return 0
