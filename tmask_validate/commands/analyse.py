"""``tmask-validate analyse``: every image and mask of one dataset (see tmask_validate.analysis).

INPUT is a simulation/noise store (zarr; ``--thickness-nm`` picks the nearest stored thickness)
or any file :func:`tmask_validate.io.load` reads (experimental data). Sites come from the store,
from ``--sites sites.csv``, or (``--structure NAME``) from the structure's projected cell laid
onto the lattice found in the virtual ADF image (:func:`tmask_validate.sites.sites_from_image`).
Writes OUT.nc (masks, images, templates; :func:`tmask_validate.analysis.analyse_dataset`),
optionally the tidy metrics CSV and, for experiments, a summary figure.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from tmask_validate.calibration import Calibration
from tmask_validate.commands._atomic import write_atomic, write_netcdf_atomic
from tmask_validate.commands.inspect import warn_if_saturated

#: datasets smaller than this are read into memory once (many passes follow)
IN_MEMORY_BYTES = 2 * 2**30


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "analyse", help="all virtual/template images, masks and controls of one dataset",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="simulation/noise store (.zarr) or a 4D-STEM data file")
    p.add_argument("--thickness-nm", type=float, default=None,
                   help="thickness to analyse (nearest stored value); stores only")
    p.add_argument("--calibration", default=None, help="calibration YAML (experimental data)")
    p.add_argument("--scan-shape", type=int, nargs=2, default=None, metavar=("SY", "SX"),
                   help="scan shape for files that do not record it")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--sites", default=None, help="site table CSV (label,y_A,x_A,...)")
    g.add_argument("--structure", default=None,
                   help="structure builder name: sites from its lattice fitted to the ADF image")
    p.add_argument("--config", default=None, help="config YAML (its analysis section is used)")
    p.add_argument("--experiment", default=None,
                   help="name in the config's experiments section: file, calibration, structure,"
                        " scan shape, sites (fit or CSV), partial region come from there")
    p.add_argument("--dose-key", default=None, help="dose key recorded in the output metadata")
    p.add_argument("--fill-missing-chunks", action="store_true",
                   help="zarr: read chunks missing from the store as the fill value (default: "
                        "a missing chunk is an error)")
    p.add_argument("--out", required=True, help="output NetCDF (.nc)")
    p.add_argument("--metrics-out", default=None, help="also write the tidy metrics CSV here")
    p.add_argument("--figure", default=None,
                   help="also write a summary figure (PNG; PDF next to it)")
    p.set_defaults(func=run)


def _load_store_dataset(path: Path, thickness_nm: float | None, *,
                        fill_missing_chunks: bool = False):
    """(data, sites, calibration, cell_A, periodic, origin_A, meta) from a simulation store."""
    import zarr

    from tmask_validate.analysis import sites_from_dataset
    from tmask_validate.io import check_zarr_chunks
    from tmask_validate.simulate import load_store

    ds = load_store(path)
    check_zarr_chunks(path, zarr.open_group(str(path), mode="r")["intensity"],
                      fill=fill_missing_chunks)
    inten = ds["intensity"]
    meta = {"structure": ds.attrs.get("structure", path.stem), "simulated": True,
            "dose_e_per_A2": ds.attrs.get("dose_e_per_A2"),
            "n_configurations": ds.attrs.get("n_configurations")}
    if "thickness" in inten.dims:
        th = ds["thickness"].values.astype(float)
        if thickness_nm is None:
            if th.size != 1:
                raise ValueError(f"{path} holds thicknesses {th.tolist()} nm: give --thickness-nm")
            i = 0
        else:
            i = int(np.argmin(np.abs(th - thickness_nm)))
        inten = inten.isel(thickness=i)
        meta["thickness_index"] = i
        meta["thickness_nm"] = float(th[i])
        if thickness_nm is not None:
            meta["thickness_config_nm"] = float(thickness_nm)
    cal = Calibration.from_dict(json.loads(ds.attrs["calibration"]))
    cell = ds.attrs.get("cell_A")
    cell = json.loads(cell) if isinstance(cell, str) else cell
    periodic = bool(ds.attrs.get("periodic", False))
    origin = (float(ds["scan_y"].values[0]), float(ds["scan_x"].values[0]))
    sites = sites_from_dataset(ds)
    if ds.attrs.get("source_store"):
        meta["source_store"] = str(ds.attrs["source_store"])
    return inten.data, sites, cal, cell, periodic, origin, meta


def _noiseless_source(meta: dict, shape) -> np.ndarray | None:
    """Noiseless intensities behind a noisy periodic store (its ``source_store``), or None."""
    from tmask_validate.simulate import load_store

    src = meta.get("source_store")
    if meta.get("dose_e_per_A2") is None or not src or not Path(src).exists():
        return None
    inten = load_store(Path(src))["intensity"]
    if "thickness" in inten.dims:
        inten = inten.isel(thickness=int(meta.get("thickness_index", 0)))
    out = np.asarray(inten.data)
    return out if out.shape == tuple(shape) else None


def _dose_of(attrs) -> float | None:
    """The dose (e-/Å²) a data file records in its metadata, or None when it records none."""
    v = attrs.get("dose_e_per_A2")
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) and v > 0 else None


def _materialise(data):
    nbytes = int(np.prod(data.shape)) * np.dtype(data.dtype).itemsize
    if nbytes <= IN_MEMORY_BYTES:
        return np.ascontiguousarray(np.asarray(data))
    return data


def _experimental_sites(data, cal: Calibration, structure: str, opts: dict, *,
                        fit_from: str = "adf"):
    """Sites for experimental data: the structure's projected cell mapped onto the ADF lattice."""
    from tmask_validate import core, structures
    from tmask_validate import sites as sitesmod

    table = structures.projected_columns(structure)
    atoms = structures.build(structure)
    cell = structures.projected_cell_A(atoms)
    det = opts["detectors_mrad"][fit_from]
    center = cal.center_px or core.estimate_center_px(data)
    angle = core.scattering_angle_mrad(data.shape[2:], center_px=center,
                                       mrad_per_px=cal.mrad_per_px)
    det = (float(det[0]), min(float(det[1]), float(np.max(angle))))
    masks = core.virtual_detector_masks(data.shape[2:], {"fit": det}, center_px=center,
                                        mrad_per_px=cal.mrad_per_px)
    fit_img = core.virtual_images(data, masks)["fit"]
    from tmask_validate.analysis import _composition_z

    heaviest = max(dict.fromkeys(table["label"]),
                   key=lambda lab: _composition_z(
                       str(table.loc[table["label"] == lab, "composition"].iloc[0]), lab))
    sites, _ = sitesmod.sites_from_image(fit_img, table, cell, step_A=cal.step_A,
                                         match_label=heaviest, invert=fit_from != "adf",
                                         rotation_deg=cal.scan_rotation_deg)
    return sites, cell


def _experiment(args, cfg):
    """The experiments-section entry, the config's folder and the lazily loaded data."""
    from tmask_validate import io
    from tmask_validate.calibration import resolve_calibration

    if cfg is None or args.experiment not in cfg.get("experiments", {}):
        raise ValueError(f"experiment {args.experiment!r} is not in the config's experiments")
    ent = cfg["experiments"][args.experiment]
    base = Path(args.config).resolve().parent
    path = Path(ent["file"]) if Path(ent["file"]).is_absolute() else base / ent["file"]
    cal_spec = ent.get("calibration")
    if isinstance(cal_spec, str) and not Path(cal_spec).is_absolute():
        cal_spec = str(base / cal_spec)
    cal = resolve_calibration(cal_spec) if cal_spec is not None else None
    arr = io.load(path, calibration=cal, dataset=ent.get("dataset"),
                  scan_shape=tuple(ent["scan_shape"]) if ent.get("scan_shape") else None,
                  fill_missing_chunks=args.fill_missing_chunks)
    return ent, base, arr


def run(args: argparse.Namespace) -> int:
    from tmask_validate.analysis import analysis_options
    from tmask_validate.config import load_config

    t0 = time.time()
    inp = Path(args.input)
    cfg = load_config(args.config) if args.config else None
    opts = analysis_options(cfg["analysis"] if cfg else None)
    if args.experiment:
        return _run_experiment(args, cfg, opts, t0)
    is_store = inp.is_dir() and (inp / "intensity").exists()
    region = None
    experimental = False
    if is_store and args.calibration is None:
        data, sites, cal, cell, periodic, origin, meta = _load_store_dataset(
            inp, args.thickness_nm, fill_missing_chunks=args.fill_missing_chunks)
    else:
        from tmask_validate import io

        arr = io.load(inp, calibration=args.calibration, thickness_nm=args.thickness_nm,
                      scan_shape=tuple(args.scan_shape) if args.scan_shape else None,
                      fill_missing_chunks=args.fill_missing_chunks)
        cal = Calibration.from_dict(json.loads(arr.attrs["calibration"]))
        cal.require(scan=True, detector=True, what=f"analyse {inp}")
        warn_if_saturated(arr)
        data, cell, periodic, origin = arr.data, None, False, (0.0, 0.0)
        meta = {"structure": args.structure or inp.stem, "source": str(inp),
                "thickness_nm": args.thickness_nm, "simulated": False,
                "dose_e_per_A2": _dose_of(arr.attrs), "dose_key": "experiment"}
        experimental = True
    data = _materialise(data)
    if args.sites:
        from tmask_validate.sites import read_sites_csv

        sites = read_sites_csv(args.sites)
    elif args.structure:
        sites, cell = _experimental_sites(data, cal, args.structure, opts)
    elif experimental:
        raise ValueError("experimental data need --sites CSV or --structure NAME")
    if args.dose_key:
        meta["dose_key"] = args.dose_key
    meta.setdefault("dose_key", "noiseless" if meta.get("dose_e_per_A2") is None else "")
    noiseless = None
    if is_store and periodic and not experimental and opts["partial"]["tile_cells"]:
        noiseless = _noiseless_source(meta, data.shape)
    for key in ("thickness_index", "source_store"):
        meta.pop(key, None)
    return _finish(args, data, sites, cal, cell, periodic, origin, meta, opts, t0,
                   experimental=experimental, region=region, noiseless=noiseless)


def _run_experiment(args, cfg, opts, t0) -> int:
    from tmask_validate.sites import read_sites_csv

    ent, base, arr = _experiment(args, cfg)
    cal = Calibration.from_dict(json.loads(arr.attrs["calibration"]))
    cal.require(scan=True, detector=True, what=f"analyse --experiment {args.experiment}")
    warn_if_saturated(arr)
    data = _materialise(arr.data)
    cell = None
    if args.sites:
        sites = read_sites_csv(args.sites)
    elif ent.get("sites", "fit") != "fit":
        sp = Path(ent["sites"])
        sites = read_sites_csv(sp if sp.is_absolute() else base / sp)
    else:
        sites, cell = _experimental_sites(data, cal, ent["structure"], opts,
                                          fit_from=ent.get("fit_from", "adf"))
    region = None
    if ent.get("region"):
        yy = np.arange(data.shape[0]) * cal.step_A[0]
        xx = np.arange(data.shape[1]) * cal.step_A[1]
        (y0, y1), (x0, x1) = ent["region"]["y_A"], ent["region"]["x_A"]
        region = ((yy[:, None] >= y0) & (yy[:, None] <= y1)
                  & (xx[None, :] >= x0) & (xx[None, :] <= x1))
    meta = {"structure": ent["structure"], "experiment": args.experiment,
            "source": str(arr.attrs.get("source", "")), "dose_key": "experiment",
            "simulated": False, "dose_e_per_A2": _dose_of(arr.attrs)}
    return _finish(args, data, sites, cal, cell, False, (0.0, 0.0), meta, opts, t0,
                   experimental=True, region=region)


def _finish(args, data, sites, cal, cell, periodic, origin, meta, opts, t0, *, experimental,
            region, noiseless=None) -> int:
    from tmask_validate.analysis import analyse_dataset, dataset_metrics

    ads = analyse_dataset(data, sites, cal, cell_A=cell, periodic=periodic, options=opts,
                          origin_A=origin, meta=meta, partial_region=region,
                          noiseless=noiseless)
    ads.attrs["wall_time_s"] = float(time.time() - t0)
    out = Path(args.out)
    write_netcdf_atomic(ads, out)
    print(f"analyse: {len(ads['name'])} images/masks -> {out} ({time.time() - t0:.1f} s)")
    if args.metrics_out or args.figure or experimental:
        df = dataset_metrics(ads, sites)
        mout = Path(args.metrics_out) if args.metrics_out else out.with_suffix(".csv")
        write_atomic(mout, lambda tmp: df.to_csv(tmp, index=False, float_format="%.6g"))
        print(f"analyse: {len(df)} metric rows -> {mout}")
    if args.figure or experimental:
        from tmask_validate import plots

        fig_path = Path(args.figure) if args.figure else out.with_suffix(".png")
        plots.dataset_overview(ads, fig_path)  # writes .png and .pdf (plots.save)
        print(f"analyse: figure -> {fig_path}")
    return 0
