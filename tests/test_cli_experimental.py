"""CLI for experimental data: `tmask-validate descan` and `tmask-validate pacbed-thickness`.

Small synthetic Merlin files (io.write_mib) with a calibration YAML; the PACBED library is a
tiny hand-made thickness-series store in the simulation-store layout (smooth toy CBED whose
fringes change with thickness), plus descan + PACBED on a smoke-scale abTEM PbTiO3 series
(~5 s; skipped without abTEM).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import yaml
from toy_cbed import toy_library, toy_pattern

from tmask_validate.calibration import Calibration
from tmask_validate.cli import main
from tmask_validate.io import load, write_mib
from tmask_validate.preprocess import disc_centers


def _write_cal(path: Path, cal: Calibration) -> Path:
    path.write_text(yaml.safe_dump(cal.to_dict()))
    return path


def _descan_file(tmp_path, sy=9, sx=11, n=40, radius=6.0, dose=300.0, seed=0):
    """Poisson BF-disc patterns whose centre follows a descan plane (1.8 px / 2.5 px across)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:sy, :sx].astype(float)
    cy = 18.3 + 0.2 * yy - 0.05 * xx
    cx = 21.1 - 0.06 * yy + 0.25 * xx
    ky, kx = np.mgrid[:n, :n].astype(float)
    r = np.hypot(ky - cy[..., None, None], kx - cx[..., None, None])
    clean = dose / (1 + np.exp((r - radius) / 0.4)) + 0.3
    data = rng.poisson(clean).astype(np.uint16)
    mib = write_mib(tmp_path / "scan.mib", data, bit_depth=12)
    cal = Calibration(step_A=(0.4, 0.45), mrad_per_px=(0.9, 0.9), energy_keV=300.0)
    return mib, _write_cal(tmp_path / "cal.yaml", cal), data, cal


@pytest.mark.parametrize("method, tol", [("integer", 0.75), ("fourier", 0.2)])
def test_descan_cli_writes_store_that_loads_with_calibration(tmp_path, method, tol, capsys):
    mib, cal_path, data, cal = _descan_file(tmp_path)
    out = tmp_path / "corrected.zarr"
    assert main(["descan", str(mib), "--scan-shape", "9", "11", "--calibration", str(cal_path),
                 "--out", str(out), "--method", method]) == 0
    assert "disc moves" in capsys.readouterr().out
    arr = load(out)
    assert arr.shape == data.shape and arr.dims == ("scan_y", "scan_x", "ky", "kx")
    assert arr.dtype == (np.uint16 if method == "integer" else np.float32)
    got = Calibration.from_dict(json.loads(arr.attrs["calibration"]))
    assert got.step_A == cal.step_A and got.mrad_per_px == cal.mrad_per_px
    assert got.energy_keV == cal.energy_keV
    np.testing.assert_allclose(arr.scan_x.values, np.arange(11) * 0.45)
    # the disc no longer moves, and the stored centre is where it now sits
    c = disc_centers(arr)
    assert np.ptp(c[0]) < 2 * tol + 0.3 and np.ptp(c[1]) < 2 * tol + 0.3
    assert np.ptp(disc_centers(data)[1]) > 2.0  # it did move before
    np.testing.assert_allclose(c.mean(axis=(1, 2)), got.center_px, atol=tol)
    # the counter depth of the recording survives (integer shifts keep the dtype)
    assert arr.attrs.get("bit_depth") == (12 if method == "integer" else None)
    if method == "integer":  # whole-pixel shifts keep exact counts
        v = arr.values
        assert v[4, 5].sum() > 0 and set(np.unique(v)) <= set(np.unique(data)) | {0}
    # existing output: refused without --overwrite (exit code 2 with a message)
    assert main(["descan", str(mib), "--scan-shape", "9", "11", "--calibration",
                 str(cal_path), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["descan", str(mib), "--scan-shape", "9", "11", "--calibration",
                 str(cal_path), "--out", str(out), "--overwrite"]) == 0
    assert not list(tmp_path.glob("corrected.zarr.tmp-*"))


def test_descan_store_is_written_in_row_chunks(tmp_path, monkeypatch):
    """Larger-than-memory path: several row chunks, read back identical to the eager result."""
    from tmask_validate.commands import descan as cmd
    from tmask_validate.preprocess import descan_correct

    mib, cal_path, data, _ = _descan_file(tmp_path, sy=10, sx=6)
    monkeypatch.setattr(cmd, "CHUNK_BYTES", 3 * 6 * 40 * 40 * 2)  # 3 rows per chunk
    out = tmp_path / "c.zarr"
    assert main(["descan", str(mib), "--scan-shape", "10", "6", "--calibration", str(cal_path),
                 "--out", str(out)]) == 0
    import zarr

    assert zarr.open_group(str(out), mode="r")["data"].chunks == (3, 6, 40, 40)
    arr = load(out)
    ref = descan_correct(load(mib, scan_shape=(10, 6), calibration=cal_path))
    np.testing.assert_array_equal(arr.values, ref.values)


# ------------------------------------------------------------------ PACBED thickness
def _library_store(path: Path, ts, shape=(97, 101), mrad=0.8, center=(48.0, 50.0)) -> Path:
    """A complete store in the simulation-store layout: intensity (thickness, sy, sx, ky, kx)."""
    lib = toy_library(ts, shape, mrad, center)
    inten = np.broadcast_to(lib.values[:, None, None], (len(ts), 2, 2) + shape).astype(np.float32)
    cal = Calibration(step_A=(0.5, 0.5), mrad_per_px=(mrad, mrad), center_px=center)
    ds = xr.Dataset(
        {"intensity": (("thickness", "scan_y", "scan_x", "ky", "kx"), inten)},
        coords={"thickness": np.asarray(ts, float), "scan_y": [0.0, 0.5], "scan_x": [0.0, 0.5],
                "ky": lib["ky"].values, "kx": lib["kx"].values},
        attrs={"calibration": json.dumps(cal.to_dict()), "complete": True})
    ds.to_zarr(str(path), mode="w", consolidated=False)
    return path


@pytest.mark.parametrize("binning", [1, 2])
def test_pacbed_thickness_cli_held_out(tmp_path, binning, capsys):
    ts = np.arange(2.0, 41.0, 2.0)
    store = _library_store(tmp_path / "lib.zarr", ts)
    t_true = 17.3  # not in the library
    shape, mrad, center = (64, 70), 0.55, (30.6, 36.2)  # another camera length, off-centre
    rng = np.random.default_rng(11)
    frames = rng.poisson(toy_pattern(shape, mrad, center, t_true) * 150.0, (6, 5) + shape)
    mib = write_mib(tmp_path / "pacbed.mib", frames.astype(np.uint16), bit_depth=12)
    cal = _write_cal(tmp_path / "cal.yaml",
                     Calibration(step_A=0.5, mrad_per_px=(mrad, mrad), center_px=center))
    out, png = tmp_path / "res.json", tmp_path / "match.png"
    assert main(["pacbed-thickness", str(mib), "--scan-shape", "6", "5", "--calibration",
                 str(cal), "--library", str(store), "--bin", str(binning), "--out", str(out),
                 "--plot", str(png)]) == 0
    assert "thickness" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert abs(res["thickness_nm"] - t_true) < 0.6, res["thickness_nm"]
    lo, hi = res["interval_nm"]
    assert lo <= res["thickness_nm"] <= hi and 0 < res["uncertainty_nm"] < 3.0
    assert res["thicknesses_nm"] == ts.tolist() and len(res["misfit"]) == len(ts)
    assert np.all(np.isfinite(res["misfit"])) and not res["at_edge"]
    assert res["binning"] == binning and res["n_patterns"] == 30
    assert res["pattern_mrad_per_px"] == pytest.approx([mrad * binning] * 2)
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"


def test_pacbed_thickness_cli_errors(tmp_path, capsys):
    ts = np.arange(2.0, 11.0, 2.0)
    store = _library_store(tmp_path / "lib.zarr", ts)
    frames = np.random.default_rng(0).poisson(
        toy_pattern((40, 40), 0.8, (20, 20), 5.0) * 50, (2, 3, 40, 40)).astype(np.uint16)
    mib = write_mib(tmp_path / "p.mib", frames, bit_depth=12)
    base = ["pacbed-thickness", str(mib), "--scan-shape", "2", "3", "--out",
            str(tmp_path / "r.json")]
    # no calibration: a clear error, exit code 2
    assert main(base + ["--library", str(store)]) == 2
    assert "mrad/px" in capsys.readouterr().err
    # incomplete library store
    import zarr

    zarr.open_group(str(store), mode="r+").attrs["complete"] = False
    assert main(base + ["--library", str(store), "--mrad-per-px", "0.8", "--step-A", "0.5"]) == 2
    assert "incomplete" in capsys.readouterr().err
    assert main(base + ["--library", str(tmp_path / "nope.zarr"), "--mrad-per-px", "0.8",
                        "--step-A", "0.5"]) == 2


def test_descan_then_pacbed_on_smoke_simulation(tmp_path):
    """A smoke-scale abTEM PbTiO3 series: hold one thickness out, descan-shift + noise, MIB,
    then `descan` and `pacbed-thickness --bin 2` recover the held-out thickness."""
    pytest.importorskip("abtem")
    import copy

    from tmask_validate.config import load_config
    from tmask_validate.simulate import simulate_structure
    from tmask_validate.synthetic import descan_shifts_px

    root = Path(__file__).resolve().parents[1]
    cfg = copy.deepcopy(load_config(root / "config" / "smoke.yaml"))
    cfg["simulation"]["phonons"]["configurations"] = 1
    cfg["structures"]["PbTiO3_100"]["thicknesses_nm"] = [2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    full = simulate_structure(cfg, "PbTiO3_100", tmp_path / "pto.zarr", progress=False)
    ds = xr.open_zarr(str(full), consolidated=False)
    held = float(ds["thickness"].values[2])
    lib = ds.sel(thickness=[t for t in ds["thickness"].values if abs(t - held) > 0.01])
    lib.attrs["complete"] = True
    lib.to_zarr(str(tmp_path / "lib.zarr"), mode="w", consolidated=False)
    sample = load(full, thickness_nm=held)
    cal = Calibration.from_dict(json.loads(sample.attrs["calibration"]))
    # tile the one-cell scan 3 x 3 and shift the patterns by a descan plane (whole pixels)
    one = np.asarray(sample.values, np.float64)
    tiled = np.tile(one, (3, 3, 1, 1))
    sy, sx = tiled.shape[:2]
    shifts = np.rint(descan_shifts_px((sy, sx), cal.step_A, [[0.3, 0.0], [0.0, -0.3]]))
    shifted = np.zeros_like(tiled)
    for i in range(sy):
        for j in range(sx):
            shifted[i, j] = np.roll(tiled[i, j], shifts[:, i, j].astype(int), axis=(0, 1))
    counts = np.random.default_rng(3).poisson(shifted * 2e4).astype(np.uint16)
    mib = write_mib(tmp_path / "pto.mib", counts, bit_depth=12)
    cal_path = _write_cal(tmp_path / "cal.yaml", cal)
    assert main(["descan", str(mib), "--scan-shape", str(sy), str(sx), "--calibration",
                 str(cal_path), "--out", str(tmp_path / "c.zarr")]) == 0
    out = tmp_path / "t.json"
    assert main(["pacbed-thickness", str(tmp_path / "c.zarr"), "--library",
                 str(tmp_path / "lib.zarr"), "--bin", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert abs(res["thickness_nm"] - held) < 0.75, (res["thickness_nm"], held)


# ---- bad input: one clear line, never a confident wrong answer (issue 10) ------------------
def _small_mib(tmp_path, sy=2, sx=4, n=16, seed=1):
    data = np.random.default_rng(seed).poisson(5.0, (sy, sx, n, n)).astype(np.uint16)
    return write_mib(tmp_path / "scan.mib", data, bit_depth=12), data


@pytest.mark.parametrize("text, scan, det", [
    ("", False, False),                      # empty file
    ("mrad_per_px: 0.5\n", False, True),     # only the detector sampling
    ("step_A: 0.4\n", True, False),          # only the scan step
])
def test_partial_calibration_is_uncalibrated_on_the_missing_axis(tmp_path, capsys, text, scan,
                                                                 det):
    mib, _ = _small_mib(tmp_path)
    cal = tmp_path / "cal.yaml"
    cal.write_text(text)
    arr = load(mib, scan_shape=(2, 4), calibration=cal)
    assert arr.attrs["scan_calibrated"] == scan and arr.attrs["detector_calibrated"] == det
    assert arr.attrs["calibrated"] == (scan and det)
    assert arr["scan_x"].attrs["units"] == ("A" if scan else "px")
    assert arr["kx"].attrs["units"] == ("mrad" if det else "px")
    assert main(["inspect", str(mib), "--scan-shape", "2", "4", "--calibration", str(cal)]) == 0
    out = capsys.readouterr().out
    assert "step [1.0, 1.0]" not in out
    assert ("scan UNCALIBRATED" in out) != scan
    assert ("detector UNCALIBRATED" in out) != det
    if not (scan and det):  # commands that need both axes refuse, naming what is missing
        assert main(["analyse", str(mib), "--scan-shape", "2", "4", "--calibration", str(cal),
                     "--structure", "LiFePO4", "--out", str(tmp_path / "a.nc")]) == 2
        err = capsys.readouterr().err
        assert "uncalibrated" in err and ("step_A" in err or "mrad_per_px" in err)


@pytest.mark.parametrize("text, words", [
    ("step_A: true\nmrad_per_px: 1\n", "step_A"),
    ("step_A: '0.4'\nmrad_per_px: 1\n", "step_A"),
    ("step_A: 0.4\nmrad_per_px: [1, yes]\n", "mrad_per_px"),
    ("step_A: 0.4\nenergy_keV: high\n", "energy_keV"),
    ("step_A: 0.4\ncenter_px: [900, -5]\n", "outside the 16x16 detector"),
    ("step_A: [0.4, 0.5\n", "line 2, column 1: YAML syntax error"),
])
def test_bad_calibration_is_one_line_naming_the_file(tmp_path, capsys, text, words):
    mib, _ = _small_mib(tmp_path)
    cal = tmp_path / "cal.yaml"
    cal.write_text(text)
    assert main(["inspect", str(mib), "--scan-shape", "2", "4", "--calibration", str(cal)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert words in err
    if "outside" not in words:
        assert str(cal) in err


def test_yaml_syntax_error_in_config_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("name: x\nseed: 1\nsimulation:\n  energy_keV: [200\n  Cs_um: 3\n")
    assert main(["workflow", "--config", str(cfg), "-n"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(cfg) in err and "line " in err, err
    assert "Traceback" not in err


def test_inspect_float_data_and_json_is_valid(tmp_path, capsys):
    """Float datasets have no counter depth (was KeyError 'bit_depth'); NaN becomes null."""
    data = np.random.default_rng(0).random((2, 3, 8, 8)).astype(np.float32)
    data[0, 0, 0, 0] = np.nan
    np.save(tmp_path / "f.npy", data)
    assert main(["inspect", str(tmp_path / "f.npy")]) == 0
    assert "no counter depth" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "f.npy"), "--json"]) == 0
    text = capsys.readouterr().out
    assert "NaN" not in text
    s = json.loads(text)  # strict JSON: NaN would parse in python's json, so check text too
    assert s["shape"] == [2, 3, 8, 8]


def test_saturated_data_warn_with_the_threshold(tmp_path, capsys):
    data = np.random.default_rng(2).poisson(5.0, (2, 4, 16, 16)).astype(np.uint16)
    data[..., :6, :6] = 4095                  # 36 / 256 = 14 % of the values at the maximum
    mib = write_mib(tmp_path / "sat.mib", data, bit_depth=12)
    assert main(["inspect", str(mib), "--scan-shape", "2", "4"]) == 0
    err = capsys.readouterr().err
    assert "14.1% of the detector values" in err and "threshold 1%" in err
    data[..., :6, :6] = 7                     # unsaturated: no warning
    mib = write_mib(tmp_path / "ok.mib", data, bit_depth=12)
    assert main(["inspect", str(mib), "--scan-shape", "2", "4"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_disk_full_is_one_line_and_leaves_no_temporary_files(tmp_path, monkeypatch, capsys):
    """ENOSPC while zarr writes (descan): one line naming the output, no traceback, no
    temporary store left behind."""
    import errno

    mib, _ = _small_mib(tmp_path)
    cal = tmp_path / "cal.yaml"
    cal.write_text("step_A: 0.4\nmrad_per_px: 0.9\n")
    real = xr.Dataset.to_zarr

    def full(self, store, *a, **kw):
        real(self.isel(scan_y=slice(0, 1)), store, *a, **kw)  # something is on disk already
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(xr.Dataset, "to_zarr", full)
    out = tmp_path / "c.zarr"
    assert main(["descan", str(mib), "--scan-shape", "2", "4", "--calibration", str(cal),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "disk full" in err and str(out) in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.yaml", "scan.hdr", "scan.mib"]


def test_netcdf_writer_disk_full_keeps_the_old_file(tmp_path, monkeypatch):
    """analyse's NetCDF writer: serialised in memory (HDF5 crashed on a full disk), the old
    output survives, the temporary file is removed, the error names the target."""
    import errno

    from tmask_validate.commands import _atomic

    ds = xr.Dataset({"a": (("y", "x"), np.arange(12.0).reshape(3, 4))})
    out = tmp_path / "a.nc"
    out.write_bytes(b"old")

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_atomic.os, "fsync", fsync)
    with pytest.raises(OSError) as info:
        _atomic.write_netcdf_atomic(ds, out)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(out)
    assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.nc"]
    monkeypatch.undo()
    _atomic.write_netcdf_atomic(ds, out)
    with xr.open_dataset(out, engine="h5netcdf") as back:
        np.testing.assert_array_equal(back["a"].values, ds["a"].values)


def test_programming_errors_are_not_user_errors(monkeypatch):
    """A TypeError inside a command is a bug: it propagates (traceback), not 'error: ...'."""
    import tmask_validate.commands.inspect as insp

    def broken(args):
        raise TypeError("unsupported operand")

    monkeypatch.setattr(insp, "load_from_arguments", broken)
    with pytest.raises(TypeError):
        main(["inspect", "whatever.npy"])


def test_noise_disk_full_is_one_line(tmp_path, monkeypatch, capsys):
    """`noise` on a full disk: one line naming the output, no temporary store left."""
    import errno

    from test_noise import _fake_store

    clean, _ = _fake_store(tmp_path)
    real = xr.Dataset.to_zarr

    def full(self, store, *a, **kw):
        real(self.isel(scan_y=slice(0, 1)), store, *a, **kw)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(xr.Dataset, "to_zarr", full)
    out = tmp_path / "n.zarr"
    assert main(["noise", str(clean), "--dose", "1e5", "--seed", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "disk full" in err and str(out) in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean.zarr"]
