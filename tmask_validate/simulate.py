"""Ground-truth 4D-STEM simulations with abTEM (the only module of the package importing abTEM).

What one call of :func:`simulate_structure` does, for one structure of a config:

1. build the crystal with :mod:`tmask_validate.structures` at the deepest thickness of the
   series (whole unit cells along the beam, lateral ``repeats`` for a fine detector sampling);
2. for each frozen-phonon configuration ``k`` (a chunk ``i:j`` of them may run as its own job)
   displace the atoms with abTEM's :class:`~abtem.FrozenPhonons` (Gaussian, per-species RMS
   displacement per Cartesian direction, seed derived from ``(config seed, structure, k)`` so
   a chunked run gives exactly the configurations of an all-at-once run), prebuild the
   potential of that one configuration (``build(lazy=False)``; building a ``FrozenPhonons``
   potential would build every configuration at once), and run one multislice pass over
   the scan with the pixelated detector *and* the annular detectors together, reading the
   whole thickness series from ``exit_planes`` in the same pass;
3. run the scan in blocks of rows (at most ``block_bytes`` of output each) and write each
   configuration's float32 result to disk (``<out>.partial/config-<k>/``, renamed into place
   when complete) so that an interrupted job resumes without recomputing finished
   configurations; the float64 running mean over configurations is computed chunk by chunk
   while the store is written, so no job holds a whole thickness series in memory;
4. write one zarr store (layout: ``/work/contracts.md``, "Simulation store") atomically: a
   temporary directory, ``complete=True`` as the last attribute written, then a rename.

abTEM orders arrays ``(scan_x, scan_y, kx, ky)`` (x first); the store uses
``(scan_y, scan_x, ky, kx)`` with scan y along cell axis 1 and scan x along cell axis 0, so
the detector axis ky is parallel to scan_y and kx to scan_x (same frame as the site tables).

Store helpers (:func:`load_store`, :func:`store_calibration`, :func:`write_store`,
:func:`combine_stores`) do not import abTEM, so readers of the stores stay light.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import time
import warnings
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from tmask_validate.calibration import Calibration

#: electron rest energy [keV]; used for the relativistic wavelength
_MC2_KEV = 510.99895
#: h c [keV Å]
_HC_KEV_A = 12.398419843320026
#: intensity variables are float32; chunks hold about this many bytes
_CHUNK_BYTES = 32 * 2**20
#: float32 4D output of one scan block of a simulation (all thicknesses)
_BLOCK_BYTES = 512 * 2**20


# --------------------------------------------------------------------------------------------
# small pure helpers
# --------------------------------------------------------------------------------------------


def wavelength_A(energy_keV: float) -> float:
    """Relativistic electron wavelength [Å] for a beam energy [keV]."""
    if not energy_keV > 0:
        raise ValueError(f"energy_keV must be positive, got {energy_keV!r}")
    return _HC_KEV_A / math.sqrt(energy_keV * (2 * _MC2_KEV + energy_keV))


def fft_friendly_size(n_min: int | float) -> int:
    """Smallest ``2^a 3^b 5^c 7^d`` that is ``>= n_min`` (fast FFT sizes).

    A grid size with a large prime factor (e.g. 1133 = 11·103) makes the FFTs of the
    multislice several times slower than the next 7-smooth size.
    """
    n_min = int(math.ceil(n_min))
    if n_min < 1:
        raise ValueError(f"grid size must be >= 1, got {n_min}")
    n = n_min
    while True:
        m = n
        for p in (2, 3, 5, 7):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def grid_gpts(extent_A: Sequence[float], sampling_A: float) -> tuple[int, int]:
    """FFT-friendly grid points for a lateral extent [Å] at (at most) ``sampling_A`` per point."""
    if not sampling_A > 0:
        raise ValueError(f"sampling_A must be positive, got {sampling_A!r}")
    return tuple(fft_friendly_size(float(e) / sampling_A - 1e-9) for e in extent_A)  # type: ignore[return-value]


def slices_per_period(period_A: float, slice_thickness_A: float) -> int:
    """Number of equal slices per beam period so that each is at most ``slice_thickness_A``.

    Slicing every beam period the same way (rather than the whole crystal) puts the exit
    planes of a thickness series exactly at whole unit cells, and makes a thickness-series
    run and separate runs at those thicknesses slice the crystal identically.
    """
    if not (period_A > 0 and slice_thickness_A > 0):
        raise ValueError("period_A and slice_thickness_A must be positive")
    return max(1, int(math.ceil(period_A / slice_thickness_A - 1e-6)))


def thickness_series(
    thicknesses_nm: Sequence[float], period_A: float, slice_thickness_A: float
) -> tuple[tuple[float, ...], tuple[int, ...], np.ndarray]:
    """Slices and abTEM exit planes of a thickness series.

    Each thickness is realised as the nearest whole number (>= 1) of beam periods (as the
    structure builders do); the crystal is as deep as the deepest one.

    Returns
    -------
    slices_A : tuple of float
        Slice thicknesses of the deepest crystal [Å].
    exit_planes : tuple of int
        0-based slice indices after which the wave is recorded (abTEM ``exit_planes``).
    thickness_nm : ndarray
        The thicknesses actually realised [nm].
    """
    t = np.asarray(thicknesses_nm, dtype=float)
    if t.ndim != 1 or t.size == 0 or np.any(~np.isfinite(t)) or np.any(t <= 0):
        raise ValueError(f"thicknesses_nm must be positive numbers, got {list(t)}")
    if np.any(np.diff(t) <= 0):
        raise ValueError(f"thicknesses_nm must be strictly increasing, got {list(t)}")
    n_cells = np.maximum(1, np.floor(10.0 * t / period_A + 0.5)).astype(int)
    if len(set(n_cells.tolist())) != len(n_cells):
        raise ValueError(
            f"thicknesses {list(t)} nm round to the same number of {period_A:.3f} Å periods"
        )
    per = slices_per_period(period_A, slice_thickness_A)
    slices = (period_A / per,) * (per * int(n_cells[-1]))
    planes = tuple(int(n * per - 1) for n in n_cells)
    return slices, planes, n_cells * period_A / 10.0


def phonon_seed(seed: int, structure: str, index: int) -> int:
    """Seed of frozen-phonon configuration ``index`` of ``structure`` (independent of chunking)."""
    ss = np.random.SeedSequence([int(seed), zlib.crc32(structure.encode()), int(index)])
    return int(ss.generate_state(1, dtype=np.uint32)[0])


def parse_range(text: str | None, n_total: int) -> tuple[int, int]:
    """Parse ``"i:j"`` (python slice of configuration indices, either end optional)."""
    if text is None or text == "":
        return 0, n_total
    parts = str(text).split(":")
    if len(parts) != 2:
        raise ValueError(f"configurations must look like 'i:j', got {text!r}")
    try:
        i = int(parts[0]) if parts[0] else 0
        j = int(parts[1]) if parts[1] else n_total
    except ValueError:
        msg = f"configurations must look like 'i:j' with integers, got {text!r}"
        raise ValueError(msg) from None
    if not 0 <= i < j <= n_total:
        raise ValueError(f"configurations {text!r} must satisfy 0 <= i < j <= {n_total}")
    return i, j


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("tmask_validate", "abtem", "ase", "numpy", "xarray", "zarr", "dask"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


# --------------------------------------------------------------------------------------------
# abTEM pieces (imported lazily)
# --------------------------------------------------------------------------------------------


def _soft_edge_aperture_class():
    """A circular aperture whose edge is a cosine taper of a given width [mrad].

    abTEM 1.0's :class:`~abtem.transfer.Aperture` only softens the edge over one detector
    pixel. The taper here runs from ``cutoff - soft_edge_mrad`` (transmission 1) to
    ``cutoff`` (transmission 0), like the ``rolloff`` of abTEM 0.x.
    """
    from abtem.core.backend import get_array_module
    from abtem.transfer import Aperture

    class SoftEdgeAperture(Aperture):
        def __init__(
            self,
            semiangle_cutoff: float,
            soft_edge_mrad: float = 0.0,
            soft: bool = True,
            energy: float | None = None,
            extent=None,
            gpts=None,
            sampling=None,
        ):
            self._soft_edge_mrad = float(soft_edge_mrad)
            super().__init__(
                semiangle_cutoff=semiangle_cutoff, soft=soft, energy=energy, extent=extent,
                gpts=gpts, sampling=sampling,
            )

        @property
        def soft_edge_mrad(self) -> float:
            return self._soft_edge_mrad

        def _evaluate_from_angular_grid(self, alpha, phi):
            if self._soft_edge_mrad <= 0:
                return super()._evaluate_from_angular_grid(alpha, phi)
            xp = get_array_module(alpha)
            cutoff = float(self.semiangle_cutoff) * 1e-3
            width = self._soft_edge_mrad * 1e-3
            ramp = xp.clip((alpha - (cutoff - width)) / width, 0.0, 1.0)
            return (0.5 * (1.0 + xp.cos(np.pi * ramp))).astype(alpha.dtype)

    return SoftEdgeAperture


def make_probe(sim: Mapping[str, Any]):
    """abTEM probe from the ``simulation`` section (energy, aperture, Cs, defocus)."""
    import abtem

    aperture = _soft_edge_aperture_class()(
        semiangle_cutoff=float(sim["semiangle_mrad"]),
        soft_edge_mrad=float(sim.get("soft_edge_mrad", 0.0)),
    )
    return abtem.Probe(
        energy=float(sim["energy_keV"]) * 1e3,
        aperture=aperture,
        Cs=float(sim["Cs_um"]) * 1e4,
        defocus=float(sim["defocus_nm"]) * 10.0,
        device=sim.get("device", "cpu"),
    )


def displaced_atoms(atoms, rms_displacement_A: Mapping[str, float], seed: int,
                    directions: str = "xyz"):
    """One frozen-phonon configuration of ``atoms`` (abTEM's Gaussian displacements).

    ``rms_displacement_A`` maps species to the RMS displacement along each direction
    (sqrt of U_iso). Every species in ``atoms`` must be listed.
    """
    from abtem import FrozenPhonons

    species = sorted(set(atoms.get_chemical_symbols()))
    missing = [s for s in species if s not in rms_displacement_A]
    if missing:
        raise ValueError(f"simulation.phonons.rms_displacement_A lacks species {missing}")
    sigmas = {s: float(rms_displacement_A[s]) for s in species}
    if all(v == 0 for v in sigmas.values()):
        return atoms.copy()
    fp = FrozenPhonons(atoms, num_configs=1, sigmas=sigmas, directions=directions, seed=seed)
    return fp.randomize(atoms)


def variant_configuration(atoms, keep: np.ndarray, rms_displacement_A: Mapping[str, float],
                          seed: int, directions: str = "xyz"):
    """One frozen-phonon configuration of a structure *variant* (atoms removed).

    The FULL structure is displaced first (exactly :func:`displaced_atoms` with the same seed),
    then the atoms with ``keep == False`` are deleted. abTEM draws displacements atom by atom,
    so displacing the reduced structure would give every remaining atom different draws; this
    way a control and its partner differ only in the removed atoms, and every shared atom sits
    at the same displaced position in both.
    """
    keep = np.asarray(keep, bool)
    if keep.shape != (len(atoms),):
        raise ValueError(f"keep must be a bool array of {len(atoms)} atoms, got {keep.shape}")
    if not keep.any():
        raise ValueError("a variant must keep at least one atom")
    return displaced_atoms(atoms, rms_displacement_A, seed, directions)[keep]


def _to_numpy(array) -> np.ndarray:
    """numpy copy of a computed abTEM array (cupy arrays are moved to the host)."""
    if hasattr(array, "get") and not isinstance(array, np.ndarray):
        array = array.get()
    return np.asarray(array)


def build_potential(atoms, sim: Mapping[str, Any], *, exit_planes: Sequence[int],
                    slices_A: Sequence[float]):
    """Prebuilt abTEM potential of one (already displaced) configuration and its grid (x, y).

    Built once (``build(lazy=False)``) and shared by every scan block of that configuration:
    a lazy potential would be rebuilt for every block.
    """
    import abtem

    lx, ly = float(atoms.cell[0, 0]), float(atoms.cell[1, 1])
    gpts = grid_gpts((lx, ly), float(sim["sampling_A"]))
    potential = abtem.Potential(
        atoms,
        gpts=gpts,
        slice_thickness=tuple(slices_A),
        parametrization=sim["parametrization"],
        projection=sim["projection"],
        exit_planes=tuple(int(i) for i in exit_planes),
        device=sim.get("device", "cpu"),
    )
    return potential.build(lazy=False), gpts


def run_configuration(
    atoms,
    sim: Mapping[str, Any],
    *,
    scan_start_A: tuple[float, float],
    scan_step_A: tuple[float, float],
    scan_shape: tuple[int, int],
    exit_planes: Sequence[int],
    slices_A: Sequence[float],
    progress: bool = False,
    potential=None,
) -> dict[str, np.ndarray]:
    """One multislice pass of an (already displaced) structure with all detectors.

    Parameters
    ----------
    atoms : ase.Atoms
        Orthogonal cell, beam along z.
    sim : mapping
        ``simulation`` config section.
    scan_start_A, scan_step_A : (y, x) pairs
        First probe position and step [Å] (scan y along cell axis 1, x along cell axis 0).
    scan_shape : (ny, nx)
        Number of probe positions (endpoint excluded).
    exit_planes : sequence of int
        0-based slice indices at which the wave is detected.
    slices_A : sequence of float
        Slice thicknesses [Å] (see :func:`thickness_series`).
    potential : (abtem potential, gpts), optional
        A prebuilt potential of ``atoms`` (:func:`build_potential`) to reuse, e.g. for the
        scan blocks of one configuration; built here when not given.

    Returns
    -------
    dict
        ``intensity`` (thickness, scan_y, scan_x, ky, kx) float32, ``detector_<NAME>``
        (thickness, scan_y, scan_x), ``mrad_per_px`` (ky, kx), ``shape`` of the detector.
    """
    import abtem

    t0, c0 = time.perf_counter(), time.process_time()
    if potential is None:
        potential = build_potential(atoms, sim, exit_planes=exit_planes, slices_A=slices_A)
    potential, gpts = potential
    t1, c1 = time.perf_counter(), time.process_time()
    probe = make_probe(sim)
    (y0, x0), (dy, dx), (ny, nx) = scan_start_A, scan_step_A, scan_shape
    scan = abtem.GridScan(
        start=(x0, y0), end=(x0 + nx * dx, y0 + ny * dy), gpts=(nx, ny), endpoint=False
    )
    names = list(sim["detectors"])
    detectors = [abtem.PixelatedDetector(max_angle=float(sim["max_angle_mrad"]))]
    detectors += [abtem.AnnularDetector(inner=float(sim["detectors"][n][0]),
                                        outer=float(sim["detectors"][n][1])) for n in names]
    max_batch = sim.get("max_batch", "auto")
    measurements = probe.scan(potential, scan=scan, detectors=detectors, max_batch=max_batch)
    # one compute for all detectors: computing them one by one reruns the multislice
    measurements = measurements.compute(progress_bar="tqdm" if progress else False)
    patterns = measurements[0]
    arr = _to_numpy(patterns.array)
    if arr.ndim == 4:
        arr = arr[None]
    if arr.shape[1:3] != (nx, ny):
        raise RuntimeError(f"unexpected abTEM output shape {arr.shape} for scan {(nx, ny)}")
    out: dict[str, np.ndarray] = {
        # abTEM (z, scan_x, scan_y, kx, ky) -> ours (z, scan_y, scan_x, ky, kx)
        "intensity": np.ascontiguousarray(arr.transpose(0, 2, 1, 4, 3), dtype=np.float32)
    }
    del arr, patterns
    for name, meas in zip(names, measurements[1:], strict=True):
        img = _to_numpy(meas.array)
        if img.ndim == 2:
            img = img[None]
        out[f"detector_{name}"] = np.ascontiguousarray(img.transpose(0, 2, 1), dtype=np.float32)
    samp = measurements[0].angular_sampling  # (kx, ky) mrad per pixel
    out["mrad_per_px"] = np.array([samp[1], samp[0]], dtype=float)
    out["gpts"] = np.array([gpts[1], gpts[0]])  # (y, x)
    t2, c2 = time.perf_counter(), time.process_time()
    # [build wall, build cpu, multislice+detect wall, multislice+detect cpu] in s
    out["timing_s"] = np.array([t1 - t0, c1 - c0, t2 - t1, c2 - c1])
    return out


def _pattern_px_bound(atoms, sim: Mapping[str, Any]) -> int:
    """Upper bound of the pixels of one pattern up to ``max_angle_mrad`` (for block sizes).

    The detector pixel is lambda / L (L = lateral cell extent) per axis; the pattern spans
    ``+-max_angle`` plus a pixel of margin on each side.
    """
    lam = wavelength_A(float(sim["energy_keV"]))
    n = 1
    for extent in (float(atoms.cell[0, 0]), float(atoms.cell[1, 1])):
        px_mrad = lam / extent * 1e3
        n *= 2 * int(math.ceil(float(sim["max_angle_mrad"]) / px_mrad)) + 3
    return n


def scan_block_rows(n_rows: int, bytes_per_row: int, block_bytes: int) -> list[tuple[int, int]]:
    """Split ``n_rows`` scan rows into ``[r0, r1)`` blocks of at most ``block_bytes`` output.

    A block holds at least one row (a row larger than ``block_bytes`` is its own block).
    """
    if n_rows < 1 or bytes_per_row < 1 or block_bytes < 1:
        raise ValueError("n_rows, bytes_per_row and block_bytes must be >= 1")
    rows = max(1, int(block_bytes) // int(bytes_per_row))
    return [(r, min(r + rows, n_rows)) for r in range(0, n_rows, rows)]


def run_configuration_to_disk(
    atoms,
    sim: Mapping[str, Any],
    out_dir: str | Path,
    *,
    scan_start_A: tuple[float, float],
    scan_step_A: tuple[float, float],
    scan_shape: tuple[int, int],
    exit_planes: Sequence[int],
    slices_A: Sequence[float],
    block_bytes: int,
    progress: bool = False,
) -> dict[str, Any]:
    """:func:`run_configuration` in blocks of scan rows, written to ``.npy`` files on disk.

    The potential is built once; the scan is run in blocks of whole scan rows holding at most
    ``block_bytes`` of float32 4D output (all thicknesses), and each block is written into a
    memory-mapped ``<out_dir>/<key>.npy`` (``intensity`` (thickness, scan_y, scan_x, ky, kx),
    ``detector_<NAME>`` (thickness, scan_y, scan_x)). Peak memory is the potential plus one
    block (plus abTEM's wave batch), not the whole configuration. ``out_dir`` is written in
    place: callers write into a temporary directory and rename it when this returns.

    Returns
    -------
    dict
        ``mrad_per_px``, ``gpts`` (y, x) and ``timing_s`` (as :func:`run_configuration`) and
        ``blocks`` (the ``(r0, r1)`` row blocks run).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.perf_counter(), time.process_time()
    pot = build_potential(atoms, sim, exit_planes=exit_planes, slices_A=slices_A)
    t1, c1 = time.perf_counter(), time.process_time()
    (y0, x0), (dy, dx), (ny, nx) = scan_start_A, scan_step_A, scan_shape

    def _block(r0: int, r1: int) -> dict[str, np.ndarray]:
        return run_configuration(
            atoms, sim, scan_start_A=(y0 + r0 * dy, x0), scan_step_A=(dy, dx),
            scan_shape=(r1 - r0, nx), exit_planes=exit_planes, slices_A=slices_A,
            progress=progress, potential=pot)

    files: dict[str, np.memmap] = {}
    meta: dict[str, Any] = {}
    row_bytes = len(exit_planes) * nx * _pattern_px_bound(atoms, sim) * 4
    blocks = scan_block_rows(ny, row_bytes, block_bytes)
    for r0, r1 in blocks:
        res = _block(r0, r1)
        meta["mrad_per_px"] = res.pop("mrad_per_px")
        meta["gpts"] = res.pop("gpts")
        res.pop("timing_s")
        for key, value in res.items():
            if key not in files:
                shape = (value.shape[0], ny) + value.shape[2:]
                files[key] = np.lib.format.open_memmap(
                    out_dir / f"{key}.npy", mode="w+", dtype=np.float32, shape=shape)
            files[key][:, r0:r1] = value
        del res
    for mm in files.values():
        mm.flush()
    del files
    t2, c2 = time.perf_counter(), time.process_time()
    meta["timing_s"] = np.array([t1 - t0, c1 - c0, t2 - t1, c2 - c1])
    meta["blocks"] = blocks
    return meta


# --------------------------------------------------------------------------------------------
# checkpointing of the running mean
# --------------------------------------------------------------------------------------------


def _checkpoint_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


#: layout version of ``<out>.partial/``: one ``config-<k>/`` directory of float32 ``.npy``
#: results per finished configuration plus ``state.json`` (version 1 held the running mean)
_CHECKPOINT_FORMAT = 2


def _config_dir(ckpt: Path, k: int) -> Path:
    return ckpt / f"config-{int(k)}"


def _save_state(ckpt: Path, state: dict) -> None:
    """Atomically replace ``<ckpt>/state.json``."""
    ckpt.mkdir(parents=True, exist_ok=True)
    tmp = ckpt / f"state.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(state))
    os.replace(tmp, ckpt / "state.json")


def _load_checkpoint(ckpt: Path, fingerprint: str) -> dict | None:
    """State of a checkpoint of the same settings, or None (a stale one is removed).

    Configurations listed as done whose result directory is missing are dropped (they are
    recomputed).
    """
    state_file = ckpt / "state.json"
    if not state_file.is_file():
        if ckpt.exists():
            shutil.rmtree(ckpt)
        return None
    state = json.loads(state_file.read_text())
    if (state.get("fingerprint") != fingerprint
            or state.get("format") != _CHECKPOINT_FORMAT):
        shutil.rmtree(ckpt)  # settings or layout changed: start afresh
        return None
    state["done"] = [k for k in state["done"] if (_config_dir(ckpt, k) / "done").is_file()]
    return state


def _store_chunks(shape: Sequence[int], itemsize: int) -> tuple[int, ...]:
    """zarr chunks of a (thickness, scan_y, scan_x, ky, kx) variable: one thickness, whole
    rows of patterns, about ``_CHUNK_BYTES`` per chunk."""
    row_bytes = int(np.prod(shape[2:])) * int(itemsize)
    rows = max(1, min(int(shape[1]), _CHUNK_BYTES // max(row_bytes, 1)))
    return (1, rows) + tuple(int(v) for v in shape[2:])


def _running_mean(arrays: Sequence[Any], chunks: Sequence[int] | None = None):
    """Lazy float64 running mean over configurations (dask), computed chunk by chunk.

    ``m = a_0; m += (a_n - m) / (n + 1)`` in float64 for n = 1, 2, ... in the given order:
    the same arithmetic as the in-memory running mean, on one chunk at a time.
    """
    import dask.array as da

    if chunks is None:
        chunks = arrays[0].shape
    lazy = [da.from_array(a, chunks=tuple(chunks)) if not isinstance(a, da.Array)
            else a.rechunk(tuple(chunks)) for a in arrays]

    def _mean(*blocks):
        m = blocks[0].astype(np.float64)
        for n, v in enumerate(blocks[1:], start=2):
            m += (v - m) / n
        return m

    return da.map_blocks(_mean, *lazy, dtype=np.float64)


def _checkpoint_mean(ckpt: Path, order: Sequence[int]) -> dict[str, Any]:
    """Lazy running means (dask, float64) of the per-configuration results in ``ckpt``."""
    first = _config_dir(ckpt, order[0])
    out: dict[str, Any] = {}
    for path in sorted(first.glob("*.npy")):
        key = path.stem
        arrays = [np.load(_config_dir(ckpt, k) / f"{key}.npy", mmap_mode="r") for k in order]
        chunks = (_store_chunks(arrays[0].shape, 4) if arrays[0].ndim == 5
                  else arrays[0].shape)
        out[key] = _running_mean(arrays, chunks)
    return out


def _write_workers() -> int:
    """Threads that write a store from lazy arrays (bounds memory: ~ a few chunks each)."""
    return max(1, min(2, os.cpu_count() or 1))


# --------------------------------------------------------------------------------------------
# the main entry point
# --------------------------------------------------------------------------------------------


def scan_positions(entry_scan: Mapping[str, Any], cell_A: Sequence[float]) -> dict[str, Any]:
    """Probe grid of a structure's ``scan`` entry.

    ``region: cell`` (default): a periodic scan of one projected cell, step reduced to divide
    it exactly (:func:`tmask_validate.structures.scan_grid`), first probe at 0, far edge
    excluded. A region ``{y_A: [y0, y1], x_A: [x0, x1]}``: the step as given, first probe at
    ``(y0, x0)``, positions ``< y1`` (``< x1``).

    Returns a dict with ``start_A``, ``step_A``, ``shape`` (all (y, x)), ``periodic``,
    ``region_A`` ((y0, y_last), (x0, x_last)) of the probe positions.
    """
    from tmask_validate import structures as st

    region = entry_scan.get("region", "cell")
    step = float(entry_scan["step_A"])
    if region == "cell":
        ny, nx, dy, dx = st.scan_grid(cell_A, step)
        y0 = x0 = 0.0
        periodic = True
    else:
        (y0, y1), (x0, x1) = (float(v) for v in region["y_A"]), (float(v) for v in region["x_A"])
        if not (y1 > y0 and x1 > x0):
            raise ValueError(f"scan region must have y1 > y0 and x1 > x0, got {region}")
        ny = max(1, math.ceil((y1 - y0) / step - 1e-9))
        nx = max(1, math.ceil((x1 - x0) / step - 1e-9))
        dy = dx = step
        periodic = False
    return {
        "start_A": (y0, x0), "step_A": (dy, dx), "shape": (ny, nx), "periodic": periodic,
        "region_A": ((y0, y0 + (ny - 1) * dy), (x0, x0 + (nx - 1) * dx)),
    }


def _structure_setup(config: Mapping[str, Any], structure: str,
                     variant: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Everything about a structure that does not depend on the phonon configuration.

    With a ``variant`` (see :func:`tmask_validate.evidence.variants_from_config`) the crystal is
    built for the variant's thickness series and ``keep`` marks the atoms it retains.
    """
    from tmask_validate import structures as st

    if structure not in config.get("structures", {}):
        raise ValueError(
            f"structure {structure!r} not in config (have {sorted(config.get('structures', {}))})"
        )
    entry = config["structures"][structure]
    if variant is not None:
        entry = dict(entry, thicknesses_nm=list(variant["thicknesses_nm"]))
        cells = [int(v) for v in variant.get("scan_cells", (1, 1))]
        if cells != [1, 1]:
            # a real multi-cell scan: the periodic slab must hold whole copies of it
            entry["repeats"] = [-(-int(r) // c) * c
                                for r, c in zip(entry.get("repeats", (1, 1)), cells, strict=True)]
    opts = dict(entry.get("builder_options") or {})
    unit = st.build(entry["builder"], thickness_nm=None, repeats=(1, 1), **opts)
    cell_A = st.projected_cell_A(unit)
    period_A = float(unit.cell[2, 2])
    sim = config["simulation"]
    slices, planes, thickness_nm = thickness_series(
        entry["thicknesses_nm"], period_A, float(sim["slice_thickness_A"]))
    atoms = st.build(entry["builder"], thickness_nm=float(thickness_nm[-1]),
                     repeats=tuple(entry.get("repeats", (1, 1))), **opts)
    if not math.isclose(float(atoms.cell[2, 2]), sum(slices), rel_tol=1e-9):
        raise RuntimeError("crystal depth and slices disagree")
    scan = scan_positions(entry["scan"], cell_A)
    sites = st.projected_columns(unit)
    if not scan["periodic"]:
        sites = st.sites_in_region(sites, cell_A, scan["region_A"])
    keep = np.ones(len(atoms), bool)
    realised: list[float] = []
    if variant is not None:
        cy, cx = (int(v) for v in variant.get("scan_cells", (1, 1)))
        if (cy, cx) != (1, 1):
            if not scan["periodic"]:
                raise ValueError(f"evidence scan_cells {[cy, cx]} needs a one-cell scan entry")
            (ny, nx), (dy, dx) = scan["shape"], scan["step_A"]
            scan = dict(scan, shape=(ny * cy, nx * cx),
                        region_A=((0.0, (ny * cy - 1) * dy), (0.0, (nx * cx - 1) * dx)))
        if variant.get("species"):
            keep = st.species_keep_mask(atoms, variant["species"], float(variant["occupancy"]),
                                        seed=int(variant["seed"]),
                                        mode=variant.get("mode", "depth"))
            _, labels = st.atom_columns(atoms)
            target = labels == variant["species"]
            z = atoms.positions[:, 2]
            for t in thickness_nm:
                inside = target & (z < 10.0 * t - 1e-6)
                realised.append(float(keep[inside].mean()) if inside.any() else float("nan"))
    return dict(atoms=atoms, scan=scan, sites=sites, slices=slices, planes=planes,
                thickness_nm=thickness_nm, entry=entry, cell_A=cell_A, keep=keep,
                variant=None if variant is None else dict(variant),
                occupancy_realised=realised)


def simulate_structure(
    config: Mapping[str, Any],
    structure: str,
    out: str | Path,
    *,
    configurations: str | tuple[int, int] | None = None,
    progress: bool = True,
    keep_checkpoint: bool = False,
    variant: Mapping[str, Any] | None = None,
    block_bytes: int | None = None,
) -> Path:
    """Simulate one structure of a config and write the simulation store ``out``.

    Parameters
    ----------
    config : mapping
        A validated config (:func:`tmask_validate.config.load_config`).
    structure : str
        Key in ``config["structures"]``.
    out : path
        Output zarr store (written atomically; an existing store is replaced).
    configurations : "i:j" or (i, j), optional
        Frozen-phonon configurations to run (python slice of ``0..n-1``); default all.
        Chunks are combined with :func:`combine_stores`.
    progress : bool
        Show tqdm progress bars (configurations and abTEM tasks).
    keep_checkpoint : bool
        Keep ``<out>.partial/`` after success (normally removed). It holds every finished
        configuration's float32 result (``config-<k>/intensity.npy`` ...), e.g. to study
        convergence with the number of configurations.
    variant : mapping, optional
        A species-evidence variant (:func:`tmask_validate.evidence.variants_from_config`):
        its own thickness series, and the atoms of one column type removed (occupancy 0) or
        thinned (0 < occupancy < 1) AFTER the phonon displacement of the full crystal
        (:func:`variant_configuration`), so every variant of a structure shares the seeds and
        the displacements of its common atoms. The variant is recorded in the store's attrs.
    block_bytes : int, optional
        Largest float32 4D output (all thicknesses) of one scan block (default
        ``_BLOCK_BYTES``). Memory holds one block, never a whole configuration, and the
        running mean over configurations is computed chunk by chunk while the store is
        written, so peak memory is about potential + block + abTEM's wave batch.

    Returns
    -------
    Path of the written store.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    if block_bytes is None:
        block_bytes = _BLOCK_BYTES
    if int(block_bytes) < 1:
        raise ValueError(f"block_bytes must be >= 1, got {block_bytes!r}")
    sim = config["simulation"]
    check_simulation(sim)
    n_total = int(sim["phonons"]["configurations"])
    if isinstance(configurations, tuple):
        i0, i1 = configurations
        parse_range(f"{i0}:{i1}", n_total)
    else:
        i0, i1 = parse_range(configurations, n_total)
    indices = list(range(i0, i1))
    seeds = [phonon_seed(int(config["seed"]), structure, k) for k in indices]

    setup = _structure_setup(config, structure, variant)
    scan = setup["scan"]
    fingerprint = json.dumps(
        {"simulation": sim, "structure": setup["entry"], "seed": config["seed"],
         "name": structure, "indices": indices, "variant": setup["variant"]},
        sort_keys=True, default=str)

    ckpt = _checkpoint_dir(out)
    state = _load_checkpoint(ckpt, fingerprint)
    if state is None:
        state = {"fingerprint": fingerprint, "format": _CHECKPOINT_FORMAT, "done": [],
                 "wall_time_s": 0.0, "cpu_time_s": 0.0, "meta": {}}
        _save_state(ckpt, state)

    todo = [k for k in indices if k not in state["done"]]
    bar = tqdm(total=len(indices), initial=len(indices) - len(todo), desc=f"{structure} phonons",
               disable=not progress, unit="config")
    for k in todo:
        t0, c0 = time.perf_counter(), time.process_time()
        atoms_k = variant_configuration(setup["atoms"], setup["keep"],
                                        sim["phonons"]["rms_displacement_A"],
                                        phonon_seed(int(config["seed"]), structure, k),
                                        sim["phonons"].get("directions", "xyz"))
        final = _config_dir(ckpt, k)
        tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
        for d in (tmp, final):
            if d.exists():
                shutil.rmtree(d)
        meta = run_configuration_to_disk(
            atoms_k, sim, tmp,
            scan_start_A=tuple(scan["start_A"]), scan_step_A=tuple(scan["step_A"]),
            scan_shape=tuple(scan["shape"]), exit_planes=setup["planes"],
            slices_A=setup["slices"], block_bytes=int(block_bytes), progress=progress,
        )
        (tmp / "done").write_text("")
        tmp.rename(final)
        state["meta"] = {"mrad_per_px": meta["mrad_per_px"].tolist(),
                         "gpts": meta["gpts"].tolist(),
                         "scan_blocks": [list(b) for b in meta["blocks"]]}
        state["potential_build_s"] = state.get("potential_build_s", 0.0) + float(
            meta["timing_s"][0])
        state["done"].append(k)
        state["wall_time_s"] += time.perf_counter() - t0
        state["cpu_time_s"] = state.get("cpu_time_s", 0.0) + time.process_time() - c0
        _save_state(ckpt, state)
        bar.update(1)
    bar.close()

    import dask

    # the mean streams from the per-configuration files into the store, chunk by chunk
    mean = _checkpoint_mean(ckpt, state["done"])
    ds = _assemble_dataset(config, structure, setup, mean, state, indices, seeds)
    with dask.config.set(scheduler="threads", num_workers=_write_workers()):
        write_store(ds, out)
    del ds, mean
    if not keep_checkpoint and ckpt.exists():
        shutil.rmtree(ckpt)
    return out


def _assemble_dataset(config, structure, setup, mean, state, indices, seeds) -> xr.Dataset:
    sim = config["simulation"]
    scan = setup["scan"]
    (y0, x0), (dy, dx), (ny, nx) = scan["start_A"], scan["step_A"], scan["shape"]
    inten = mean["intensity"].astype(np.float32)
    nky, nkx = inten.shape[-2:]
    mrad = state["meta"]["mrad_per_px"]
    center = (nky // 2, nkx // 2)
    ky = (np.arange(nky) - center[0]) * mrad[0]
    kx = (np.arange(nkx) - center[1]) * mrad[1]
    cal = Calibration(step_A=(dy, dx), mrad_per_px=tuple(mrad), center_px=center,
                      energy_keV=float(sim["energy_keV"]), scan_rotation_deg=0.0,
                      extra={"source": "abTEM simulation", "structure": structure})
    coords = {
        "thickness": ("thickness", np.asarray(setup["thickness_nm"], dtype=float),
                      {"units": "nm"}),
        "scan_y": ("scan_y", y0 + dy * np.arange(ny), {"units": "Å"}),
        "scan_x": ("scan_x", x0 + dx * np.arange(nx), {"units": "Å"}),
        "ky": ("ky", ky, {"units": "mrad"}),
        "kx": ("kx", kx, {"units": "mrad"}),
    }
    data_vars = {
        "intensity": (("thickness", "scan_y", "scan_x", "ky", "kx"), inten,
                      {"units": "fraction of probe intensity per pixel"}),
    }
    for key in sorted(k for k in mean if k.startswith("detector_")):
        name = key[len("detector_"):]
        data_vars[key] = (("thickness", "scan_y", "scan_x"), mean[key].astype(np.float32),
                          {"inner_mrad": float(sim["detectors"][name][0]),
                           "outer_mrad": float(sim["detectors"][name][1]),
                           "units": "fraction of probe intensity"})
    sites = setup["sites"]
    # strings as python objects: zarr v3 stores them as variable-length UTF-8
    data_vars["site_label"] = ("site", np.asarray(sites["label"], dtype=str).astype(object))
    data_vars["site_y_A"] = ("site", np.asarray(sites["y_A"], dtype=float))
    data_vars["site_x_A"] = ("site", np.asarray(sites["x_A"], dtype=float))
    data_vars["site_composition"] = (
        "site", np.asarray(sites["composition"], dtype=str).astype(object))
    data_vars["site_n_atoms"] = ("site", np.asarray(sites["n_atoms"], dtype=np.int64))
    for col in sites.columns:
        if col not in ("label", "y_A", "x_A", "composition", "n_atoms"):
            vals = np.asarray(sites[col])
            if vals.dtype == object or vals.dtype.kind == "U":
                vals = vals.astype(str).astype(object)
            data_vars[f"site_{col}"] = ("site", vals)
    attrs = {
        "structure": structure,
        "calibration": json.dumps(cal.to_dict()),
        "cell_A": [float(v) for v in setup["cell_A"]],
        "periodic": bool(scan["periodic"]),
        "config": json.dumps(config, default=str),
        "versions": json.dumps(_versions()),
        "seeds": json.dumps(seeds),
        "configurations": json.dumps(indices),
        "n_configurations": len(indices),
        "wall_time_s": float(state["wall_time_s"]),
        "cpu_time_s": float(state.get("cpu_time_s", 0.0)),
        "potential_build_s": float(state.get("potential_build_s", 0.0)),
        "exit_planes": json.dumps([int(i) for i in setup["planes"]]),
        "grid_gpts": json.dumps(state["meta"]["gpts"]),
        "dose_e_per_A2": None,
        "variant": json.dumps(setup.get("variant")),
        "occupancy_realised": json.dumps(setup.get("occupancy_realised", [])),
        "complete": False,
    }
    return xr.Dataset(data_vars=data_vars, coords=coords, attrs=attrs)


# --------------------------------------------------------------------------------------------
# store I/O (no abTEM)
# --------------------------------------------------------------------------------------------


def _encoding(ds: xr.Dataset) -> dict[str, dict]:
    enc: dict[str, dict] = {}
    for name, var in ds.data_vars.items():
        if var.dims[-2:] == ("ky", "kx"):
            enc[name] = {"chunks": _store_chunks(var.shape, var.dtype.itemsize)}
    return enc


def write_store(ds: xr.Dataset, path: str | Path) -> Path:
    """Write ``ds`` as a zarr store atomically; ``complete=True`` is set last.

    Writes into ``<path>.tmp-<pid>``, marks it complete (and consolidates the metadata, so
    ``xarray.open_zarr(path)`` works with its defaults), then renames it over ``path``
    (an existing store is moved aside first and removed after the rename). If anything
    fails the temporary directory is removed and ``path`` is left untouched.
    """
    import zarr

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    ds = ds.copy()
    ds.attrs = dict(ds.attrs)
    ds.attrs["complete"] = False
    try:
        # every chunk stored, also all-zero ones: a missing chunk then always means damage
        ds.to_zarr(tmp, mode="w", encoding=_encoding(ds), consolidated=False,
                   write_empty_chunks=True)
        group = zarr.open_group(str(tmp), mode="r+")
        group.attrs["complete"] = True
        # consolidated metadata (written after `complete`) lets xr.open_zarr(path) open the
        # store quietly; load_store reads the group metadata itself
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "not part of the Zarr format 3 specification"
            zarr.consolidate_metadata(str(tmp))
        old = path.with_name(path.name + f".old-{os.getpid()}")
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_store(path: str | Path) -> xr.Dataset:
    """Open a simulation (or noise) store lazily; raises if it is missing or incomplete."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"simulation store not found: {path}")
    try:
        ds = xr.open_zarr(path, consolidated=False)
    except Exception as exc:  # noqa: BLE001 - report any zarr failure the same way
        raise ValueError(f"{path} is not a readable zarr store: {exc}") from exc
    if ds.attrs.get("complete") is not True:
        raise ValueError(
            f"{path} is incomplete (attribute complete={ds.attrs.get('complete')!r}): "
            "the writing job did not finish; rerun it"
        )
    return ds


def store_calibration(ds: xr.Dataset) -> Calibration:
    """The :class:`Calibration` recorded in a store's attributes."""
    if "calibration" not in ds.attrs:
        raise ValueError("dataset has no 'calibration' attribute")
    return Calibration.from_dict(json.loads(ds.attrs["calibration"]))


def store_sites(ds: xr.Dataset):
    """Site table (pandas DataFrame, columns label, y_A, x_A, composition, n_atoms, ...)."""
    import pandas as pd

    first = ["label", "y_A", "x_A", "composition", "n_atoms"]
    names = [n[len("site_"):] for n in ds.data_vars
             if n.startswith("site_") and ds[n].dims == ("site",)]
    order = [c for c in first if c in names] + sorted(c for c in names if c not in first)
    return pd.DataFrame({c: ds[f"site_{c}"].values for c in order})


def _simulation_identity(config: Mapping[str, Any], structure: str) -> dict[str, Any]:
    """The parts of a config that determine a structure's simulation (for combine checks)."""
    sim = dict(config.get("simulation", {}))
    phonons = dict(sim.get("phonons", {}))
    phonons.pop("chunk_size", None)  # how the work is split does not change the result
    sim["phonons"] = phonons
    return {"seed": config.get("seed"), "simulation": sim,
            "structure": config.get("structures", {}).get(structure)}


def combine_stores(paths: Iterable[str | Path], out: str | Path) -> Path:
    """Weighted mean (by ``n_configurations``) of chunk stores of the same simulation.

    The chunks must come from the same config and structure and cover disjoint
    configurations; the result equals (to float32 rounding) one run with all of them.
    Streams: each output zarr chunk (one thickness, whole rows of patterns, ~32 MiB) is
    accumulated in float64 from the same chunk of every input and written, two chunks at a
    time, so memory stays at a few chunks whatever the size of the stores.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("combine needs at least one input store")
    stores = [load_store(p) for p in paths]
    first = stores[0]
    ref_cfg = _simulation_identity(json.loads(first.attrs["config"]), first.attrs["structure"])
    seen: list[int] = []
    for p, ds in zip(paths, stores, strict=True):
        if ds.attrs.get("structure") != first.attrs.get("structure"):
            raise ValueError(f"{p}: structure {ds.attrs.get('structure')!r} differs from "
                             f"{first.attrs.get('structure')!r}")
        cfg = _simulation_identity(json.loads(ds.attrs["config"]), ds.attrs["structure"])
        if cfg != ref_cfg:
            diff = sorted(k for k in ref_cfg if ref_cfg[k] != cfg.get(k))
            raise ValueError(f"{p}: simulated with different settings ({diff}) than {paths[0]}")
        if ds.attrs.get("dose_e_per_A2") is not None:
            raise ValueError(f"{p}: noisy stores cannot be combined")
        if ds.attrs.get("variant", "null") != first.attrs.get("variant", "null"):
            raise ValueError(f"{p}: structure variant {ds.attrs.get('variant')} differs from "
                             f"{first.attrs.get('variant')}")
        for name in ("intensity",):
            if ds[name].shape != first[name].shape:
                raise ValueError(f"{p}: {name} shape {ds[name].shape} != {first[name].shape}")
        idx = json.loads(ds.attrs["configurations"])
        overlap = set(idx) & set(seen)
        if overlap:
            raise ValueError(f"{p}: configurations {sorted(overlap)} appear in two inputs")
        seen += idx
    weights = np.array([float(ds.attrs["n_configurations"]) for ds in stores])
    weights = weights / weights.sum()
    out_vars = {}
    for name, var in first.data_vars.items():
        if "thickness" in var.dims:
            mean = _weighted_sum([ds[name].data for ds in stores], weights,
                                 _combine_chunks(var))
            out_vars[name] = (var.dims, mean.astype(np.float32), dict(var.attrs))
        else:
            out_vars[name] = (var.dims, var.values, dict(var.attrs))
    order = np.argsort(seen)
    seeds = sum((json.loads(ds.attrs["seeds"]) for ds in stores), [])
    attrs = dict(first.attrs)
    attrs.update(
        seeds=json.dumps([seeds[i] for i in order]),
        configurations=json.dumps(sorted(seen)),
        n_configurations=int(sum(ds.attrs["n_configurations"] for ds in stores)),
        wall_time_s=float(sum(ds.attrs["wall_time_s"] for ds in stores)),
        cpu_time_s=float(sum(ds.attrs.get("cpu_time_s", 0.0) for ds in stores)),
        complete=False,
    )
    coords = {k: (v.dims, v.values, dict(v.attrs)) for k, v in first.coords.items()}
    combined = xr.Dataset(out_vars, coords=coords, attrs=attrs)
    import dask

    # streams: every output chunk reads the same chunk of each input, one chunk at a time
    with dask.config.set(scheduler="threads", num_workers=_write_workers()):
        return write_store(combined, out)


def _combine_chunks(var: xr.DataArray) -> tuple[int, ...]:
    """Chunks of a combined variable: the store's own for 4D data, else one per thickness."""
    if var.dims[-2:] == ("ky", "kx"):
        return _store_chunks(var.shape, 4)
    return (1,) + tuple(int(v) for v in var.shape[1:])


def _weighted_sum(arrays: Sequence[Any], weights: np.ndarray, chunks: Sequence[int]):
    """Lazy float64 ``sum_i w_i a_i`` (dask), accumulated chunk by chunk in input order.

    The arithmetic per element is that of ``acc = 0; acc += w_i * float64(a_i)``.
    """
    import dask.array as da

    lazy = [a.rechunk(tuple(chunks)) if isinstance(a, da.Array)
            else da.from_array(a, chunks=tuple(chunks)) for a in arrays]
    w = [float(v) for v in weights]

    def _acc(*blocks):
        acc = np.zeros(blocks[0].shape, dtype=np.float64)
        for wi, b in zip(w, blocks, strict=True):
            acc += wi * b.astype(np.float64)
        return acc

    return da.map_blocks(_acc, *lazy, dtype=np.float64)


def noise_store(in_path: str | Path, out: str | Path, *, dose_e_per_A2: float,
                seed: int) -> Path:
    """Write a Poisson-noisy copy (uint32 counts) of a noiseless store (same layout).

    Expected counts per pattern = ``dose * step_y * step_x`` times the stored intensity
    (see :mod:`tmask_validate.noise`). The conventional detector images get independent
    Poisson noise (they model separate physical detectors). Streams chunk by chunk.
    """
    import dask.array as da

    from tmask_validate import noise

    ds = load_store(in_path)
    if ds.attrs.get("dose_e_per_A2") is not None:
        raise ValueError(f"{in_path} already holds noisy data (dose {ds.attrs['dose_e_per_A2']})")
    cal = store_calibration(ds)
    electrons = noise.electrons_per_probe(dose_e_per_A2, cal.step_A)
    out_vars = {}
    for name, var in ds.data_vars.items():
        if var.dims[:2] != ("thickness", "scan_y"):
            out_vars[name] = var
            continue
        stream = noise.stream_id(name)

        def _block(x, block_info=None, _stream=stream):
            loc = block_info[0]["array-location"]
            t0, t1 = loc[0]
            r0 = loc[1][0]
            res = np.empty(x.shape, dtype=np.uint32)
            for j, t in enumerate(range(t0, t1)):
                res[j] = noise.poisson_counts(
                    x[j], electrons, seed=seed, dose_e_per_A2=dose_e_per_A2,
                    thickness_index=t, row0=r0, stream=_stream)
            return res

        arr = var.data if isinstance(var.data, da.Array) else da.from_array(var.values)
        counts = arr.map_blocks(_block, dtype=np.uint32)
        attrs = dict(var.attrs, units="counts (electrons)")
        out_vars[name] = xr.Variable(var.dims, counts, attrs)
    attrs = dict(ds.attrs)
    attrs.update(dose_e_per_A2=float(dose_e_per_A2), electrons_per_probe=float(electrons),
                 noise_seed=int(seed), source_store=str(in_path), complete=False)
    noisy = xr.Dataset(out_vars, coords=ds.coords, attrs=attrs)
    for name in noisy.data_vars:
        noisy[name].encoding = {}
    return write_store(noisy, out)


def check_simulation(sim: Mapping[str, Any]) -> None:
    """Checks of the ``simulation`` section that a JSON schema cannot express.

    Raises ``ValueError`` naming the offending key: detector limits not increasing, or a
    detector/pixelated range beyond abTEM's antialiasing cutoff (2/3 of the Nyquist angle of
    ``sampling_A``).
    """
    lam = wavelength_A(float(sim["energy_keV"]))
    cutoff = 2.0 / 3.0 * lam / (2.0 * float(sim["sampling_A"])) * 1e3
    if float(sim["max_angle_mrad"]) > cutoff:
        raise ValueError(
            f"simulation.max_angle_mrad: {sim['max_angle_mrad']} mrad exceeds the antialiasing "
            f"cutoff {cutoff:.1f} mrad of sampling_A={sim['sampling_A']}; use a finer sampling")
    for name, (inner, outer) in sim["detectors"].items():
        if not float(outer) > float(inner):
            raise ValueError(
                f"simulation.detectors.{name}: outer {outer} must exceed inner {inner}")
        if float(outer) > cutoff:
            raise ValueError(
                f"simulation.detectors.{name}: outer angle {outer} mrad exceeds the antialiasing "
                f"cutoff {cutoff:.1f} mrad of sampling_A={sim['sampling_A']}")


def _abtem_patterns(intensity: np.ndarray, mrad_per_px: Sequence[float],
                    step_A: Sequence[float]):
    """Store-layout data ``(scan_y, scan_x, ky, kx)`` as abTEM ``DiffractionPatterns``.

    abTEM's order is ``(scan_x, scan_y, kx, ky)``. The reciprocal sampling is handed over in
    mrad, so abTEM's "1/Å" coordinates are mrad (no energy needed); ``fftshift=True`` puts
    zero angle at index ``n // 2`` like the store.
    """
    from abtem.core.axes import ScanAxis
    from abtem.measurements import DiffractionPatterns

    arr = np.asarray(intensity, dtype=np.float32)
    if arr.ndim != 4:
        raise ValueError(f"expected (scan_y, scan_x, ky, kx) data, got shape {arr.shape}")
    my, mx = (float(v) for v in mrad_per_px)
    sy, sx = (float(v) for v in step_A)
    return DiffractionPatterns(
        arr.transpose(1, 0, 3, 2).copy(),
        sampling=(mx, my),
        fftshift=True,
        ensemble_axes_metadata=[ScanAxis(label="x", sampling=sx, units="Å"),
                                ScanAxis(label="y", sampling=sy, units="Å")],
    )


def abtem_com_divides_by_total() -> bool:
    """Whether the installed abTEM divides its centre of mass by the pattern's intensity.

    abTEM PR #417 discusses an unnormalised ``center_of_mass``; abTEM 1.0.11 as installed
    here divides by the total (``DiffractionPatterns._com``). Checked on a pattern with
    total intensity 2 and a one-pixel (1 mrad) shift.
    """
    d = np.zeros((1, 1, 5, 5), dtype=np.float32)
    d[0, 0, 2, 3] = 2.0
    com = np.asarray(_abtem_patterns(d, (1.0, 1.0), (1.0, 1.0)).center_of_mass().array)
    return bool(np.isclose(com.ravel()[0].real, 1.0))


def abtem_center_of_mass(intensity: np.ndarray, mrad_per_px: Sequence[float], *,
                         normalise: bool = True) -> np.ndarray:
    """abTEM's own centre of mass of data in the store layout, returned in the store layout.

    abTEM returns a complex image ``x + i y`` on ``(scan_x, scan_y)``; this returns
    ``(2, scan_y, scan_x)`` with ``[0] = y`` (ky) and ``[1] = x`` (kx) in mrad, origin at the
    zero-angle pixel ``n // 2``. With ``normalise`` the result is divided by each pattern's
    total intensity unless abTEM already does that (:func:`abtem_com_divides_by_total`).
    """
    arr = np.asarray(intensity, dtype=np.float32)
    com = np.asarray(_abtem_patterns(arr, mrad_per_px, (1.0, 1.0)).center_of_mass().array)
    out = np.stack([com.imag.T, com.real.T]).astype(np.float64)
    if normalise and not abtem_com_divides_by_total():
        tot = arr.sum(axis=(-2, -1), dtype=np.float64)
        out = np.divide(out, tot, out=np.zeros_like(out), where=tot != 0)
    return out


def abtem_integrated_center_of_mass(intensity: np.ndarray, mrad_per_px: Sequence[float],
                                    step_A: Sequence[float]) -> np.ndarray:
    """abTEM's iCoM (periodic Fourier integration, minimum set to 0), store layout (sy, sx).

    Uses abTEM's own (normalised, see :func:`abtem_com_divides_by_total`) centre of mass;
    units mrad x Å like :func:`tmask_validate.core.integrated_center_of_mass`.
    """
    pats = _abtem_patterns(intensity, mrad_per_px, step_A)
    icom = np.asarray(pats.integrated_center_of_mass().array, dtype=np.float64)
    if not abtem_com_divides_by_total():
        raise NotImplementedError("this abTEM does not normalise its CoM; normalise first")
    return icom.T
