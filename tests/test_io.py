"""tmask_validate.io: real Merlin/fpd files, MIB round trips, HDF5/zarr/npy/raw, calibration."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import dask.array as da
import h5py
import numpy as np
import pytest
import xarray as xr
import yaml

from tmask_validate.calibration import (
    Calibration,
    calibration_from_flags,
    calibration_from_mapping,
    mrad_per_px_from_camera_length,
)
from tmask_validate.io import infer_mib_scan_shape, load, read_mib_header, write_mib

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-merlin"
if not REAL.is_dir():
    REAL = Path("/work/shared/data/real-merlin")
needs_real = pytest.mark.skipif(not REAL.is_dir(), reason="real Merlin test files not available")


def _rng_data(shape, bits, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 2**bits, size=shape, dtype=np.uint64 if bits > 16 else np.uint32)


# ------------------------------------------------------------------ real files
@pytest.fixture(scope="module")
def real_zip(tmp_path_factory):
    if not REAL.is_dir():
        pytest.skip("real Merlin test files not available")
    out = tmp_path_factory.mktemp("merlin")
    with zipfile.ZipFile(REAL / "Merlin_navigation4x2_ROI.zip") as zf:
        zf.extractall(out)
    return out


@needs_real
@pytest.mark.parametrize("name,shape", [("001_4x2_6bit.mib", (2, 4, 256, 256)),
                                        ("002_4x2_6bit_roi128.mib", (2, 4, 128, 256))])
def test_real_merlin_6bit(real_zip, name, shape):
    a = load(real_zip / name)
    assert a.shape == shape and a.dtype == np.uint8
    assert a.dims == ("scan_y", "scan_x", "ky", "kx")
    assert isinstance(a.data, da.Array)
    assert a.attrs["bit_depth"] == 6 and a.attrs["saturation_value"] == 63
    assert a.attrs["scan_shape_source"].startswith("frame timestamps")
    assert a.attrs["calibrated"] == 0 and a.attrs["detector_units"] == "px"
    v = a.values
    assert v.max() <= 63
    # explicit scan shape gives the same array
    b = load(real_zip / name, scan_shape=(2, 4))
    np.testing.assert_array_equal(b.values, v)
    # rosettasciio flips rows for display; we keep the stored order
    from rsciio.quantumdetector import file_reader

    r = np.asarray(file_reader(str(real_zip / name), navigation_shape=(4, 2))[0]["data"])
    np.testing.assert_array_equal(r[..., ::-1, :], v)
    with pytest.raises(ValueError, match="needs 9 frames but the file holds only 8"):
        load(real_zip / name, scan_shape=(3, 3))


@needs_real
def test_real_single_mib_12bit():
    with pytest.raises(ValueError, match="needs 4 frames"):
        load(REAL / "SingleMIB.mib", scan_shape=(2, 2))
    a = load(REAL / "SingleMIB.mib", scan_shape=(1, 1))
    assert a.shape == (1, 1, 256, 256) and a.dtype == np.uint16
    assert a.attrs["stored_dtype"] == ">u2" and a.attrs["bit_depth"] == 12
    frame = a.values[0, 0]
    # a bright-field disc: the brightest pixels sit well inside the detector
    iy, ix = np.unravel_index(np.argmax(frame), frame.shape)
    assert 10 < iy < 246 and 10 < ix < 246 and frame.max() <= 4095
    # same bytes as a direct big-endian read
    head = read_mib_header(REAL / "SingleMIB.mib")
    raw = np.fromfile(REAL / "SingleMIB.mib", dtype=">u2", offset=head["header_bytes"],
                      count=256 * 256).reshape(256, 256)
    np.testing.assert_array_equal(frame, raw)


@needs_real
def test_real_fpd_hdf5():
    a = load(REAL / "FPD_HDF5.hdf5")
    assert a.shape == (16, 16, 256, 256) and a.dtype == np.uint16
    assert a.attrs["dataset"] == "fpd_expt/fpd_data/data"
    assert a.attrs["stored_dtype"] == ">u2" and a.attrs["bit_depth"] == 12
    assert json.loads(a.attrs["hdf5_dims"]) == ["scanY", "scanX", "detY", "detX"]
    with h5py.File(REAL / "FPD_HDF5.hdf5") as f:
        ref = f["fpd_expt/fpd_data/data"][3, 5]
        sum_dif = f["fpd_expt/fpd_sum_dif/data"][()]
    np.testing.assert_array_equal(a.values[3, 5], ref)
    np.testing.assert_array_equal(a.sum(("scan_y", "scan_x")).values, sum_dif)
    b = load(REAL / "FPD_HDF5.hdf5", dataset="fpd_expt/fpd_data/data")
    assert b.shape == a.shape


@needs_real
def test_loaded_array_writes_to_netcdf(tmp_path):
    a = load(REAL / "FPD_HDF5.hdf5").isel(scan_y=slice(0, 2))
    a.to_netcdf(tmp_path / "x.nc", engine="h5netcdf")
    back = xr.open_dataarray(tmp_path / "x.nc", engine="h5netcdf")
    np.testing.assert_array_equal(back.values, a.values)
    assert json.loads(back.attrs["calibration"]) == json.loads(a.attrs["calibration"])


# ------------------------------------------------------------------ MIB round trips
@pytest.mark.parametrize("bits", [1, 6, 12, 24])
def test_write_mib_roundtrip(tmp_path, bits):
    data = _rng_data((3, 5, 16, 24), bits, seed=bits)
    p = write_mib(tmp_path / "x.mib", data, bit_depth=bits)
    a = load(p)
    assert a.shape == data.shape
    assert a.attrs["bit_depth"] == bits
    assert a.attrs["scan_shape_source"].startswith("frame timestamps")
    np.testing.assert_array_equal(a.values, data)
    expect = {1: np.uint8, 6: np.uint8, 12: np.uint16, 24: np.uint32}[bits]
    assert a.dtype == expect
    # the file really is big-endian
    head = read_mib_header(p)
    first = np.fromfile(p, dtype=head["stored_dtype"], offset=head["header_bytes"],
                        count=16 * 24).reshape(16, 24)
    np.testing.assert_array_equal(first, data[0, 0])


def test_write_mib_line_trigger_hdr_gives_scan_shape(tmp_path):
    data = _rng_data((4, 3, 8, 8), 12)
    p = write_mib(tmp_path / "x.mib", data, frames_per_trigger=None, flyback_s=0.0)
    a = load(p)
    assert a.shape == data.shape and a.attrs["scan_shape_source"].startswith("hdr")
    np.testing.assert_array_equal(a.values, data)


def test_mib_without_scan_shape_asks(tmp_path):
    data = _rng_data((2, 3, 8, 8), 12)
    p = write_mib(tmp_path / "x.mib", data, flyback_s=0.0, header=False)
    with pytest.raises(ValueError, match="pass scan_shape"):
        load(p)
    a = load(p, scan_shape=(3, 2))
    np.testing.assert_array_equal(a.values, data.reshape(3, 2, 8, 8))


def test_mib_quad_header(tmp_path):
    data = _rng_data((1, 2, 260, 258), 12)
    p = write_mib(tmp_path / "q.mib", data)
    assert read_mib_header(p)["header_bytes"] == 768
    np.testing.assert_array_equal(load(p, scan_shape=(1, 2)).values, data)


@pytest.mark.parametrize("cut", [1, 384 + 100])
def test_truncated_mib_is_a_clear_error(tmp_path, cut):
    data = _rng_data((2, 3, 8, 8), 12)
    p = write_mib(tmp_path / "x.mib", data)
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) - cut])
    frame_bytes = 384 + 8 * 8 * 2
    n_ok = (len(raw) - cut) // frame_bytes
    with pytest.raises(ValueError, match=f"truncated MIB file: {n_ok} complete frames"):
        load(p)


def test_truncated_mib_whole_frames_missing(tmp_path):
    data = _rng_data((2, 3, 8, 8), 12)
    p = write_mib(tmp_path / "x.mib", data)
    raw = p.read_bytes()
    p.write_bytes(raw[: 4 * (384 + 128)])
    with pytest.raises(ValueError, match="announces 6 frames but only 4 complete"):
        load(p)


def test_write_mib_rejects_out_of_range(tmp_path):
    with pytest.raises(ValueError, match=r"\[0, 63\]"):
        write_mib(tmp_path / "x.mib", np.full((1, 1, 4, 4), 64), bit_depth=6)
    with pytest.raises(ValueError, match="bit_depth"):
        write_mib(tmp_path / "x.mib", np.zeros((1, 1, 4, 4), int), bit_depth=8)


def test_infer_scan_shape_from_timestamps():
    t = np.concatenate([np.arange(4) * 1.0 + 10.5 * line for line in range(3)])
    assert infer_mib_scan_shape(t) == (3, 4)
    assert infer_mib_scan_shape(np.arange(12.0)) is None
    t_bad = t.copy()
    t_bad[6:] += 0.3  # an irregular pause mid-line
    assert infer_mib_scan_shape(t_bad) is None


# ------------------------------------------------------------------ other formats
def test_hdf5_plain_dataset_and_autodetect(tmp_path):
    data = _rng_data((3, 4, 6, 5), 16).astype(">u2")
    p1, p = tmp_path / "one.h5", tmp_path / "d.h5"
    with h5py.File(p1, "w") as f:
        f["some/where/frames"] = data
        f["other"] = np.zeros((3, 3))
    a = load(p1)
    assert a.attrs["dataset"] == "some/where/frames"
    np.testing.assert_array_equal(a.values, data)
    with h5py.File(p, "w") as f:
        f["first"] = data
        f["second"] = data
        f["stack"] = data.reshape(12, 6, 5)
    with pytest.raises(ValueError, match="several 4D datasets"):
        load(p)
    np.testing.assert_array_equal(load(p, dataset="second").values, data)
    np.testing.assert_array_equal(load(p, dataset="stack", scan_shape=(3, 4)).values, data)
    with pytest.raises(ValueError, match="pass scan_shape"):
        load(p, dataset="stack")


def test_npy_and_raw(tmp_path):
    data = _rng_data((3, 4, 6, 5), 16).astype(np.uint16)
    np.save(tmp_path / "d.npy", data)
    np.testing.assert_array_equal(load(tmp_path / "d.npy").values, data)
    # raw: 10-byte file header, 4-byte per-frame header, big-endian
    frames = data.reshape(12, 6, 5).astype(">u2")
    blob = b"H" * 10 + b"".join(b"FFFF" + fr.tobytes() for fr in frames)
    (tmp_path / "d.raw").write_bytes(blob)
    kw = dict(dtype=">u2", frame_shape=(6, 5), header_bytes=10, frame_header_bytes=4)
    a = load(tmp_path / "d.raw", scan_shape=(3, 4), **kw)
    np.testing.assert_array_equal(a.values, data)
    assert a.attrs["stored_dtype"] == ">u2" and a.dtype == np.uint16
    with pytest.raises(ValueError, match="pass scan_shape"):
        load(tmp_path / "d.raw", **kw)
    (tmp_path / "t.raw").write_bytes(blob[:-7])
    with pytest.raises(ValueError, match="11 complete frames"):
        load(tmp_path / "t.raw", scan_shape=(3, 4), **kw)
    with pytest.raises(ValueError, match="dtype= and frame_shape"):
        load(tmp_path / "d.raw")


def _sim_store(path, thicknesses=(2.0, 4.0)):
    rng = np.random.default_rng(3)
    inten = rng.random((len(thicknesses), 3, 4, 6, 6)).astype(np.float32)
    cal = Calibration(step_A=(0.5, 0.4), mrad_per_px=(2.0, 2.0), center_px=(3.0, 3.0))
    ds = xr.Dataset(
        {"intensity": (("thickness", "scan_y", "scan_x", "ky", "kx"), inten)},
        coords={"thickness": list(thicknesses), "scan_y": np.arange(3) * 0.5,
                "scan_x": np.arange(4) * 0.4, "ky": (np.arange(6) - 3) * 2.0,
                "kx": (np.arange(6) - 3) * 2.0},
        attrs={"calibration": json.dumps(cal.to_dict()), "structure": "toy", "complete": True},
    )
    ds.to_zarr(path)
    return inten, cal


def test_zarr_simulation_store(tmp_path):
    inten, cal = _sim_store(tmp_path / "s.zarr")
    a = load(tmp_path / "s.zarr", thickness_nm=4.0)
    np.testing.assert_array_equal(a.values, inten[1])
    assert Calibration.from_dict(json.loads(a.attrs["calibration"])) == cal
    np.testing.assert_allclose(a.kx.values, (np.arange(6) - 3) * 2.0)
    np.testing.assert_allclose(a.scan_x.values, np.arange(4) * 0.4)
    np.testing.assert_array_equal(load(tmp_path / "s.zarr", select={"thickness": 2.0}).values,
                                  inten[0])
    with pytest.raises(ValueError, match="thickness_nm="):
        load(tmp_path / "s.zarr")
    b = load(tmp_path / "s.zarr", thickness_nm=3.2)  # nearest stored thickness
    np.testing.assert_array_equal(b.values, inten[1])
    assert b.attrs["selected_thickness"] == 4.0
    with pytest.raises(ValueError, match="not in the store"):
        load(tmp_path / "s.zarr", thickness_nm=6.5)


def test_plain_zarr_arrays(tmp_path):
    """Bare zarr arrays (dask.array.to_zarr, zarr.save_array), 4D or a frame stack."""
    import zarr

    rng = np.random.default_rng(7)
    data = rng.integers(0, 4000, size=(3, 5, 6, 7), dtype=np.uint16)
    da.from_array(data, chunks=(1, 5, 6, 7)).to_zarr(str(tmp_path / "d.zarr"))
    a = load(tmp_path / "d.zarr")
    assert a.dims == ("scan_y", "scan_x", "ky", "kx")
    np.testing.assert_array_equal(a.values, data)
    assert a.attrs["format"] == "zarr-array"
    # a frame stack needs the scan shape (argument, or a scan_shape attribute)
    zarr.save_array(str(tmp_path / "f.zarr"), data.reshape(15, 6, 7))
    with pytest.raises(ValueError, match="scan_shape"):
        load(tmp_path / "f.zarr")
    np.testing.assert_array_equal(load(tmp_path / "f.zarr", scan_shape=(3, 5)).values, data)
    cal = Calibration(step_A=(0.5, 0.4), mrad_per_px=(1.5, 1.5), center_px=(3.0, 3.5),
                      energy_keV=200.0)
    z = zarr.open_array(str(tmp_path / "f.zarr"), mode="r+")
    z.attrs["scan_shape"] = [3, 5]
    z.attrs["calibration"] = json.dumps(cal.to_dict())
    b = load(tmp_path / "f.zarr")
    np.testing.assert_array_equal(b.values, data)
    assert Calibration.from_dict(json.loads(b.attrs["calibration"])) == cal
    np.testing.assert_allclose(b.scan_x.values, np.arange(5) * 0.4)
    with pytest.raises(ValueError, match="plain zarr array"):
        load(tmp_path / "d.zarr", thickness_nm=3.0)
    (tmp_path / "junk.zarr").mkdir()
    with pytest.raises(ValueError, match="not a readable zarr store"):
        load(tmp_path / "junk.zarr")


# ------------------------------------------------------------------ calibration
def test_calibration_sidecar_and_coords(tmp_path):
    data = _rng_data((2, 3, 8, 10), 12)
    p = write_mib(tmp_path / "x.mib", data)
    side = {"step_nm": 0.05, "camera_length_mm": 110.0, "pixel_size_um": 55.0,
            "energy_keV": 300.0, "center_px": [4.0, 5.0], "scan_rotation_deg": 12.0}
    (tmp_path / "x.mib.calibration.yaml").write_text(yaml.safe_dump(side))
    a = load(p)
    cal = Calibration.from_dict(json.loads(a.attrs["calibration"]))
    assert a.attrs["calibrated"] == 1 and a.attrs["detector_units"] == "mrad"
    assert cal.mrad_per_px == (0.5, 0.5) and cal.step_A == (0.5, 0.5)
    assert cal.energy_keV == 300.0 and cal.scan_rotation_deg == 12.0
    assert cal.extra["camera_length_mm"] == 110.0
    np.testing.assert_allclose(a.kx.values, (np.arange(10) - 5.0) * 0.5)
    np.testing.assert_allclose(a.ky.values, (np.arange(8) - 4.0) * 0.5)
    np.testing.assert_allclose(a.scan_x.values, [0.0, 0.5, 1.0])
    # an explicit calibration wins over the sidecar
    b = load(p, calibration={"step_A": 2.0, "mrad_per_px": 1.5})
    assert json.loads(b.attrs["calibration"])["mrad_per_px"] == [1.5, 1.5]
    assert b.attrs["center_px_source"].startswith("detector centre")
    np.testing.assert_allclose(b.kx.values, (np.arange(10) - 4.5) * 1.5)


def test_calibration_helpers():
    assert mrad_per_px_from_camera_length(110.0, 55.0) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        mrad_per_px_from_camera_length(0.0, 55.0)
    with pytest.raises(ValueError, match="together"):
        calibration_from_mapping({"camera_length_mm": 100.0})
    with pytest.raises(ValueError, match="unknown calibration keys"):
        calibration_from_mapping({"stepsize": 1.0})
    base = Calibration(step_A=(1.0, 1.0), mrad_per_px=(0.3, 0.3), energy_keV=200.0)
    c = calibration_from_flags(base=base, camera_length_mm=55.0, pixel_size_um=55.0)
    assert c.mrad_per_px == (1.0, 1.0) and c.step_A == (1.0, 1.0)
    assert calibration_from_flags() is None


def test_unknown_format_and_missing(tmp_path):
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "nope.mib")
    (tmp_path / "x.tif").write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown 4D-STEM file format"):
        load(tmp_path / "x.tif")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="not a readable zarr store"):
        load(tmp_path / "plain")


# ------------------------------------------------------------------ config schema
def test_experiments_schema_defaults_and_errors():
    from tmask_validate.config import validate_config

    cfg = validate_config({"name": "x", "seed": 0, "experiments": {
        "lfp": {"file": "a.mib", "structure": "lifepo4", "scan_shape": [4, 2]},
        "fpd": {"file": "b.hdf5", "structure": "pbtio3", "sites": "s.csv", "fit_from": "abf",
                "calibration": {"step_nm": 0.04, "camera_length_mm": 110, "pixel_size_um": 55},
                "region": {"y_A": [0, 10], "x_A": [5, 20]},
                "dataset": "fpd_expt/fpd_data/data"}}})
    lfp = cfg["experiments"]["lfp"]
    assert lfp["sites"] == "fit" and lfp["fit_from"] == "adf" and lfp["region"] is None
    assert lfp["calibration"] is None and lfp["dataset"] is None
    cal = calibration_from_mapping(cfg["experiments"]["fpd"]["calibration"])
    assert cal.step_A == (0.4, 0.4) and cal.mrad_per_px == (0.5, 0.5)
    assert validate_config({"name": "x", "seed": 0})["experiments"] == {}
    for bad in ({"file": "a.mib"},  # no structure
                {"file": "a.mib", "structure": "s", "fit_from": "haadf"},
                {"file": "a.mib", "structure": "s", "scan_shape": [0, 3]},
                {"file": "a.mib", "structure": "s", "calibration": {"stepsize": 1}},
                {"file": "a.mib", "structure": "s", "region": {"y_A": [0, 1]}}):
        with pytest.raises(ValueError):
            validate_config({"name": "x", "seed": 0, "experiments": {"e": bad}})


def test_abtem_zarr_and_xarray(tmp_path):
    pytest.importorskip("abtem")
    from abtem.core.axes import ScanAxis
    from abtem.measurements import DiffractionPatterns

    from tmask_validate.io import electron_wavelength_A

    arr = np.random.default_rng(0).random((3, 4, 6, 8)).astype(np.float32)  # (x, y, kx, ky)
    dp = DiffractionPatterns(arr, sampling=(0.1, 0.12), metadata={"energy": 200e3},
                             ensemble_axes_metadata=[
                                 ScanAxis(label="x", sampling=0.5, units="Å", offset=0.0),
                                 ScanAxis(label="y", sampling=0.4, units="Å", offset=0.0)])
    dp.to_zarr(str(tmp_path / "ab.zarr"))
    lam = electron_wavelength_A(200e3)
    assert lam == pytest.approx(0.025079, rel=1e-4)
    for a in (load(tmp_path / "ab.zarr"), None):
        if a is None:
            dp.to_data_array().to_dataset(name="diffraction").to_zarr(tmp_path / "xa.zarr")
            a = load(tmp_path / "xa.zarr")
        assert a.shape == (4, 3, 8, 6)
        np.testing.assert_array_equal(a.values, arr.transpose(1, 0, 3, 2))
        cal = Calibration.from_dict(json.loads(a.attrs["calibration"]))
        assert cal.step_A == pytest.approx((0.4, 0.5))
        assert cal.mrad_per_px == pytest.approx((0.12 * lam * 1e3, 0.1 * lam * 1e3))
        assert cal.energy_keV == pytest.approx(200.0)
        # zero angle at the centre of the (unshifted, centred) abTEM grid
        assert a.kx.values[3] == pytest.approx(0.0, abs=1e-9)
        assert a.ky.values[4] == pytest.approx(0.0, abs=1e-9)


def test_hdf5_py4dstem_layout_preferred(tmp_path):
    data = _rng_data((2, 3, 5, 4), 8).astype(np.uint8)
    p = tmp_path / "p4d.h5"
    with h5py.File(p, "w") as f:
        f["4DSTEM_experiment/data/datacubes/datacube_0/data"] = data
        f["4DSTEM_experiment/data/datacubes/datacube_0"].attrs["emd_group_type"] = 1
        f["4DSTEM_experiment/data/realslices/virtual/data"] = np.zeros((2, 3, 2, 2))
    a = load(p)
    assert a.attrs["dataset"] == "4DSTEM_experiment/data/datacubes/datacube_0/data"
    np.testing.assert_array_equal(a.values, data)
    with pytest.raises(ValueError, match="no dataset 'nope'"):
        load(p, dataset="nope")


def test_missing_zarr_chunk_is_an_error_unless_filled(tmp_path, capsys):
    """zarr reads a missing chunk as the fill value; we refuse (load, inspect, analyse,
    pacbed-thickness) unless --fill-missing-chunks is given."""
    from tmask_validate.cli import main

    store = tmp_path / "s.zarr"
    inten, cal = _sim_store(store)
    xr.open_zarr(store).load().to_zarr(  # rewrite with one chunk per scan row
        tmp_path / "r.zarr", encoding={"intensity": {"chunks": (1, 1, 4, 6, 6)}})
    store = tmp_path / "r.zarr"
    load(store, thickness_nm=4.0)  # complete: fine
    chunk = store / "intensity" / "c" / "1" / "2" / "0" / "0" / "0"
    assert chunk.is_file()
    chunk.unlink()
    with pytest.raises(ValueError, match=r"missing chunk \[1, 2, 0, 0, 0\]") as info:
        load(store, thickness_nm=4.0)
    assert str(store) in str(info.value) and "1 of 6 chunks" in str(info.value)
    assert main(["inspect", str(store), "--thickness-nm", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing chunk" in err, err
    assert main(["analyse", str(store), "--thickness-nm", "4", "--out",
                 str(tmp_path / "a.nc")]) == 2
    assert "missing chunk" in capsys.readouterr().err
    assert not (tmp_path / "a.nc").exists()
    # asked for explicitly: the fill value, and the count is recorded
    a = load(store, thickness_nm=4.0, fill_missing_chunks=True)
    assert a.attrs["missing_chunks"] == 1
    np.testing.assert_array_equal(a.values[:2], inten[1][:2])
    assert main(["inspect", str(store), "--thickness-nm", "4", "--fill-missing-chunks"]) == 0


def test_missing_chunk_in_pacbed_library_is_an_error(tmp_path, capsys):
    from tmask_validate.cli import main

    store = tmp_path / "lib.zarr"
    _sim_store(tmp_path / "s.zarr")
    xr.open_zarr(tmp_path / "s.zarr").load().to_zarr(
        store, encoding={"intensity": {"chunks": (1, 3, 4, 6, 6)}})
    (store / "intensity" / "c" / "0" / "0" / "0" / "0" / "0").unlink()
    data = np.random.default_rng(0).poisson(5.0, (2, 2, 6, 6)).astype(np.uint16)
    np.save(tmp_path / "d.npy", data)
    assert main(["pacbed-thickness", str(tmp_path / "d.npy"), "--mrad-per-px", "2",
                 "--library", str(store), "--out", str(tmp_path / "r.json")]) == 2
    assert "missing chunk [0, 0, 0, 0, 0]" in capsys.readouterr().err


def test_scan_shape_disagreeing_with_timestamps_warns(tmp_path, capsys):
    from tmask_validate.cli import main
    from tmask_validate.io import DataWarning

    data = _rng_data((2, 4, 8, 8), 12)
    p = write_mib(tmp_path / "x.mib", data)  # flyback gaps after every 4th frame
    assert load(p).shape[:2] == (2, 4)
    with pytest.warns(DataWarning, match=r"given scan shape \(1, 8\) disagrees with the "
                                         r"\(2, 4\) of the frame timestamps"):
        a = load(p, scan_shape=(1, 8))
    assert a.shape[:2] == (1, 8) and "disagrees" in a.attrs["scan_shape_warning"]
    assert main(["inspect", str(p), "--scan-shape", "1", "8"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: ") == 1 and "disagrees with the (2, 4)" in err, err


def test_mib_header_dimensions_that_disagree_with_the_data(tmp_path):
    """A header that claims 8x10 frames over 8x8 data is reported as that, not 'truncated'."""
    data = _rng_data((2, 3, 8, 8), 12)
    p = write_mib(tmp_path / "x.mib", data)
    raw = bytearray(p.read_bytes())
    head = raw[:384].decode()
    assert head.split(",")[4] == "0008"
    raw[:384] = head.replace(",0008,0008,", ",0010,0008,", 1).encode()
    p.write_bytes(bytes(raw))
    with pytest.raises(ValueError) as info:
        load(p, scan_shape=(2, 3))
    msg = str(info.value)
    assert "truncated" not in msg and "disagree with the data" in msg, msg
    assert "8x10 pixels" in msg and "next frame header starts at byte 512" in msg


def test_garbage_hdr_names_the_file(tmp_path, capsys):
    from tmask_validate.cli import main

    data = _rng_data((2, 3, 8, 8), 12)
    p = write_mib(tmp_path / "x.mib", data)
    hdr = tmp_path / "x.hdr"
    hdr.write_bytes(np.random.default_rng(0).integers(128, 256, 300).astype(np.uint8).tobytes())
    with pytest.raises(ValueError, match="x.hdr: not a Merlin .hdr file"):
        load(p, scan_shape=(2, 3))
    assert main(["inspect", str(p), "--scan-shape", "2", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(hdr) in err, err
    hdr.write_text("hello, world\n")  # text, but not a Merlin header
    with pytest.raises(ValueError, match="does not start with 'HDR'"):
        load(p, scan_shape=(2, 3))


def test_mib_header_scan_reads_ahead_small_files_only(tmp_path, monkeypatch):
    """Inferring the scan shape from the frame headers asks for read-ahead of the whole file
    when it fits in half the free memory (cold files: one streamed read, not a seek per frame)."""
    import os

    from tmask_validate import io as tio

    data = np.random.default_rng(3).integers(0, 4096, size=(3, 4, 8, 8))
    p = write_mib(tmp_path / "x.mib", data, bit_depth=12, frames_per_trigger=1)
    calls = []
    real = os.posix_fadvise
    monkeypatch.setattr(tio.os, "posix_fadvise",
                        lambda fd, off, ln, adv: calls.append(adv) or real(fd, off, ln, adv))
    assert tio.mib_memmap(p).shape == data.shape  # shape from the flyback gaps
    assert calls == [os.POSIX_FADV_WILLNEED]
    calls.clear()
    monkeypatch.setattr(tio, "_readahead_budget_bytes", lambda: 10)
    assert tio.mib_memmap(p).shape == data.shape
    assert calls == []
