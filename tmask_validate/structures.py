"""Crystal structures for the simulations and their projected atom-column tables.

Builders return :class:`ase.Atoms` ready for a multislice simulation: orthogonal cell, the beam
along **+z**, the projected cell in the x-y plane, tiled laterally by ``repeats=(ny, nx)`` and
along the beam by an integer number of cells chosen from ``thickness_nm``.

Conventions (shared with the rest of the package, see ``/work/contracts.md``)
-----------------------------------------------------------------------------
* Scan/image coordinates: ``y_A`` ↔ cell y (image rows), ``x_A`` ↔ cell x (image columns), Å,
  origin at the cell origin; a periodic one-cell scan starts at 0 and excludes the far edge.
* **LiFePO4 [001]** (Pnma): crystal a → x (10.33 Å), b → y (6.01 Å), c → z (beam, 4.69 Å).
  The projected cell is ``(Ly, Lx) = (b, a)``.
* **PbTiO3 [100]** (P4mm): crystal b → x (3.904 Å), the polar axis c → y (4.152 Å, "c vertical"),
  a → z (beam). The projected cell is ``(Ly, Lx) = (c, a)``.  (x, y, z) = (b, c, a) is
  right-handed.
* **PbTiO3 90° domain wall** (``"PbTiO3_DW"``): square ``n_cells x n_cells`` pseudo-cubic
  supercell in projection; domain 1 has its c axis along y, domain 2 along x; two periodic
  {011} walls along the lines ``y - x = const`` (diagonal from top left to bottom right when
  y points down the image), see :func:`pbtio3_domain_wall`.

Thickness: ``thickness_nm`` is converted to the *nearest* integer number of beam periods, at
least one (:func:`n_repeats_for_thickness`); the number used and the resulting thickness are
stored in ``atoms.info["n_repeats_z"]`` and ``atoms.info["thickness_nm"]``.

Column tables (:func:`projected_columns`): atoms whose projected positions lie within
``tol_A`` (default 0.35 Å, single linkage, periodic) form one column.  Labels are compositions,
heaviest element first, joined by "+": LiFePO4 [001] → "Li", "Fe", "P+O", "O"; PbTiO3 [100]
→ "Pb", "Ti+O", "O" (along [100] the Ti column also holds one O per period; with the polar
displacements they sit 0.30 Å apart in projection, closer than any resolvable distance, and the
paper calls them "Ti+O" columns).  The column position is that of its heaviest element.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import ase
import ase.io
import numpy as np
import pandas as pd
from ase.data import atomic_numbers
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

__all__ = [
    "BUILDERS",
    "build",
    "lifepo4",
    "load_cif",
    "n_repeats_for_thickness",
    "pbtio3",
    "pbtio3_domain_wall",
    "atom_columns",
    "projected_cell_A",
    "projected_columns",
    "species_keep_mask",
    "scan_from_config",
    "scan_grid",
    "sites_in_region",
    "structure_dir",
    "wall_distance_A",
]

#: builder names accepted by :func:`build` (and the config's ``structures.<name>.builder``)
BUILDERS = ("LiFePO4", "PbTiO3", "PbTiO3_DW")

#: expected composition of each CIF (element -> atoms per conventional cell)
_EXPECTED = {
    "LiFePO4": {"Li": 4, "Fe": 4, "P": 4, "O": 16},
    "PbTiO3": {"Pb": 1, "Ti": 1, "O": 3},
}

#: default tolerance (Å) for grouping atoms into one projected column
COLUMN_TOL_A = 0.35


# ----------------------------------------------------------------------------- CIF loading
def structure_dir() -> Path:
    """Folder holding the CIF files (``$TMASK_STRUCTURES_DIR`` or ``<repo>/structures``)."""
    env = os.environ.get("TMASK_STRUCTURES_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1] / "structures"


@cache
def _read_cif_cached(path: str) -> ase.Atoms:
    return ase.io.read(path, format="cif")


def load_cif(name: str) -> ase.Atoms:
    """Read ``structures/<name>.cif`` (expanded by its space group) and check its composition.

    Parameters
    ----------
    name : {"LiFePO4", "PbTiO3"}
        Structure name (file stem).

    Returns
    -------
    ase.Atoms
        Conventional cell with crystal a, b, c along x, y, z (fresh copy).

    Raises
    ------
    ValueError
        Unknown name, non-orthogonal cell or a composition other than the expected one
        (LiFePO4: 28 atoms = 4 f.u.; PbTiO3: 5 atoms).
    FileNotFoundError
        The CIF file is missing.
    """
    if name not in _EXPECTED:
        raise ValueError(f"no CIF for {name!r}; known: {sorted(_EXPECTED)}")
    path = structure_dir() / f"{name}.cif"
    if not path.is_file():
        raise FileNotFoundError(f"CIF file not found: {path}")
    atoms = _read_cif_cached(str(path)).copy()
    symbols = atoms.get_chemical_symbols()
    counts = {el: symbols.count(el) for el in set(symbols)}
    if counts != _EXPECTED[name]:
        raise ValueError(f"{path}: composition {counts} != expected {_EXPECTED[name]}")
    cell = np.asarray(atoms.cell)
    if not np.allclose(cell, np.diag(np.diag(cell)), atol=1e-6):
        raise ValueError(f"{path}: expected an orthogonal cell with a, b, c along x, y, z")
    atoms.wrap()
    # drop reader metadata (Spacegroup objects etc. are not serialisable); keep the source
    atoms.info = {"source_cif": path.name}
    return atoms


# ----------------------------------------------------------------------------- helpers
def n_repeats_for_thickness(thickness_nm: float | None, period_A: float) -> int:
    """Number of beam periods for a requested thickness: nearest integer, at least 1.

    Parameters
    ----------
    thickness_nm : float or None
        Requested specimen thickness (nm); None means one period.
    period_A : float
        Repeat distance along the beam (Å).

    Returns
    -------
    int
        ``max(1, round(10 * thickness_nm / period_A))`` (halves round up).
    """
    if period_A <= 0 or not math.isfinite(period_A):
        raise ValueError(f"period_A must be a positive number, got {period_A}")
    if thickness_nm is None:
        return 1
    t = float(thickness_nm)
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"thickness_nm must be a positive number or None, got {thickness_nm}")
    return max(1, int(math.floor(10.0 * t / period_A + 0.5)))


def _check_repeats(repeats: Sequence[int]) -> tuple[int, int]:
    msg = f"repeats must be two positive integers (ny, nx), got {repeats!r}"
    try:
        ny, nx = (int(r) for r in repeats)
    except (TypeError, ValueError):
        raise ValueError(msg) from None
    if ny < 1 or nx < 1 or (ny, nx) != tuple(repeats):
        raise ValueError(msg)
    return ny, nx


def _finish(atoms: ase.Atoms, *, name: str, zone_axis: str, thickness_nm: float | None,
            repeats: Sequence[int], info: dict[str, Any] | None = None) -> ase.Atoms:
    """Tile (x by nx, y by ny, z by nz), set pbc and record metadata in ``atoms.info``."""
    ny, nx = _check_repeats(repeats)
    period_A = float(atoms.cell[2, 2])
    nz = n_repeats_for_thickness(thickness_nm, period_A)
    atoms.pbc = True
    atoms.wrap()
    out = atoms.repeat((nx, ny, nz))
    out.info.update(info or {})
    out.info.update(
        structure=name,
        zone_axis=zone_axis,
        beam_period_A=period_A,
        n_repeats_z=nz,
        thickness_nm=nz * period_A / 10.0,
        requested_thickness_nm=None if thickness_nm is None else float(thickness_nm),
        repeats=(ny, nx),
        cell_A=projected_cell_A(out),
    )
    return out


# ----------------------------------------------------------------------------- builders
def lifepo4(thickness_nm: float | None = None, repeats: Sequence[int] = (1, 1)) -> ase.Atoms:
    """Olivine LiFePO4 viewed along [001].

    Parameters
    ----------
    thickness_nm : float or None
        Thickness along the beam; converted to the nearest whole number of c periods (≥ 1).
        None gives one cell (4.692 Å).
    repeats : (int, int)
        Lateral tiling ``(ny, nx)`` of the projected cell (b along y, a along x).

    Returns
    -------
    ase.Atoms
        Orthogonal cell ``diag(nx*a, ny*b, nz*c)``, beam along +z, 28 atoms per cell;
        ``info`` holds ``n_repeats_z``, ``thickness_nm``, ``cell_A``, ``zone_axis`` etc.
    """
    atoms = load_cif("LiFePO4")
    return _finish(atoms, name="LiFePO4", zone_axis="[001]", thickness_nm=thickness_nm,
                   repeats=repeats)


def _pbtio3_100_cell() -> ase.Atoms:
    """One PbTiO3 cell reoriented for [100]: x = b, y = c (polar), z = a (beam)."""
    cif = load_cif("PbTiO3")
    a, b, c = np.diag(np.asarray(cif.cell))
    frac = cif.get_scaled_positions(wrap=True)
    # (x, y, z) <- (b, c, a): a cyclic permutation, so handedness is kept
    new_frac = frac[:, [1, 2, 0]]
    atoms = ase.Atoms(cif.get_chemical_symbols(), cell=np.diag([b, c, a]), pbc=True)
    atoms.set_scaled_positions(new_frac)
    return atoms


def pbtio3(thickness_nm: float | None = None, repeats: Sequence[int] = (1, 1)) -> ase.Atoms:
    """Tetragonal PbTiO3 (single domain) viewed along [100].

    The polar c axis lies along **y** (image vertical), b along x, a along the beam (z).

    Parameters
    ----------
    thickness_nm : float or None
        Thickness; nearest whole number of a periods (≥ 1); None = one cell (3.904 Å).
    repeats : (int, int)
        Lateral tiling ``(ny, nx)`` (c along y, b along x).

    Returns
    -------
    ase.Atoms
        Cell ``diag(nx*b, ny*c, nz*a)``, 5 atoms per cell, beam along +z.
    """
    atoms = _pbtio3_100_cell()
    info = {"polar_axis": "y", "polarisation_yx": _polarisation_domain1()}
    return _finish(atoms, name="PbTiO3", zone_axis="[100]", thickness_nm=thickness_nm,
                   repeats=repeats, info=info)


def _pbtio3_displacements() -> dict[str, float]:
    """Polar displacements (Å, along +c) of Ti, apical O1 and equatorial O2 relative to Pb."""
    cif = load_cif("PbTiO3")
    c = float(cif.cell[2, 2])
    frac = cif.get_scaled_positions(wrap=True)
    sym = cif.get_chemical_symbols()
    out: dict[str, float] = {}
    for s, (fx, fy, fz) in zip(sym, frac, strict=True):
        if s == "Ti":
            out["Ti"] = (fz - 0.5) * c
        elif s == "O" and abs(fx - 0.5) < 1e-6 and abs(fy - 0.5) < 1e-6:
            out["O1"] = ((fz + 0.5) % 1.0 - 0.5) * c  # ideal z = 0
        elif s == "O" and "O2" not in out:
            out["O2"] = (fz - 0.5) * c  # ideal z = 1/2
    return out


def _polarisation_domain1() -> tuple[float, float]:
    """Unit (y, x) direction of P in the [100] cell: sign of Ti minus O-cage shift along y."""
    d = _pbtio3_displacements()
    # centre of the O6 cage around Ti: 2 apical O1 and 4 equatorial O2
    cage = (2.0 * d["O1"] + 4.0 * d["O2"]) / 6.0
    return (float(np.sign(d["Ti"] - cage)), 0.0)


def _rot90(y: float, x: float) -> tuple[float, float]:
    """Rotate a (y, x) vector by +90° about z: (x, y) -> (-y, x)."""
    return (x, -y)


def pbtio3_domain_wall(thickness_nm: float | None = None, n_cells: int = 8,
                       repeats: Sequence[int] = (1, 1), a_pc_A: float | None = None) -> ase.Atoms:
    """PbTiO3 supercell with two periodic 90° {011} ferroelastic domain walls, viewed along [100].

    Construction (a commensurate approximant for imaging tests, not for energetics):

    * Projected lattice: square, pseudo-cubic, parameter ``a_pc_A`` (default ``(a + c) / 2``
      = 4.028 Å, the mean of the two in-plane axes of either domain); the beam period is the
      true ``a`` (3.904 Å), common to both domains, so the cell is exactly periodic along z.
      The tetragonal strain (c/a = 1.063) and the small lattice rotation across the wall are
      dropped; the polar displacements of each domain (from the CIF) are kept.
    * Sites: for every pseudo-cubic cell ``(i, j)`` the 5 ideal perovskite sites Pb (0, 0, 0),
      Ti (½, ½, ½), O (½, 0, ½), O (0, ½, ½), O (½, ½, 0) in (x, y, z) fractions.
    * Domain 1: c along **y**; Ti and O shifted along +y by their CIF displacements
      (P along -y with the Shirane et al. values).  Domain 2: domain 1 rotated by +90° about the
      beam: c along **x**, shifts along -x, P along +x.  Across the wall the normal component of
      P is continuous and the parallel one reverses: a neutral head-to-tail 90° wall.
    * Walls: the {011} planes containing the beam, i.e. the lines ``y - x = const`` in projection.
      A site whose *ideal* position has ``u = (y - x)/a_pc`` with
      ``(u + 1/4) mod n_cells < n_cells/2`` belongs to domain 1, else to domain 2; the walls lie
      at ``u = -1/4`` and ``u = n_cells/2 - 1/4`` (between a PbTiO plane and an O2 plane, so each
      domain holds n_cells/2 of each kind of diagonal plane).

    Parameters
    ----------
    thickness_nm : float or None
        Thickness; nearest whole number of a periods (≥ 1).
    n_cells : int
        Even number (≥ 4) of pseudo-cubic cells along x and y of the supercell.
    repeats : (int, int)
        Lateral tiling ``(ny, nx)`` of the supercell.
    a_pc_A : float, optional
        Pseudo-cubic in-plane lattice parameter (Å).

    Returns
    -------
    ase.Atoms
        ``5 n_cells²`` atoms per period; ``arrays["domain"]`` (1 or 2) per atom; ``info`` has
        ``walls`` (list of ``{"y_minus_x_A": const}``), ``wall_period_A`` (= Lx = Ly),
        ``a_pc_A``, ``polarisation_yx`` ({1: (py, px), 2: (py, px)}) plus the usual keys.
    """
    n = int(n_cells)
    if n != n_cells or n < 4 or n % 2:
        raise ValueError(f"n_cells must be an even integer >= 4, got {n_cells!r}")
    cif = load_cif("PbTiO3")
    a_true, c_true = float(cif.cell[0, 0]), float(cif.cell[2, 2])
    a_pc = 0.5 * (a_true + c_true) if a_pc_A is None else float(a_pc_A)
    if not math.isfinite(a_pc) or a_pc <= 0:
        raise ValueError(f"a_pc_A must be a positive number, got {a_pc_A!r}")
    d = _pbtio3_displacements()
    # ideal sites (x, y, z fractions) with their domain-1 displacement along +y (Å) and their
    # domain-2 displacement along -x: domain 2 = R(+90°) domain 1, so the site at (½, 0) in
    # domain 2 is the image of the domain-1 site (0, ½) (O2), and (0, ½) the image of (½, 0) (O1)
    sites = [
        ("Pb", (0.0, 0.0, 0.0), 0.0, 0.0),
        ("Ti", (0.5, 0.5, 0.5), d["Ti"], d["Ti"]),
        ("O", (0.5, 0.0, 0.5), d["O1"], d["O2"]),  # apical O in domain 1, equatorial in 2
        ("O", (0.0, 0.5, 0.5), d["O2"], d["O1"]),  # equatorial in domain 1, apical in 2
        ("O", (0.5, 0.5, 0.0), d["O2"], d["O2"]),  # the O of the Ti+O column (both domains)
    ]
    symbols, pos, dom = [], [], []
    for i in range(n):  # x
        for j in range(n):  # y
            for sym, (fx, fy, fz), d1, d2 in sites:
                u = (j + fy) - (i + fx)
                domain = 1 if ((u + 0.25) % n) < n / 2 else 2
                x, y = (i + fx) * a_pc, (j + fy) * a_pc
                if domain == 1:
                    y += d1
                else:
                    x -= d2
                symbols.append(sym)
                pos.append((x, y, fz * a_true))
                dom.append(domain)
    L = n * a_pc
    atoms = ase.Atoms(symbols, positions=pos, cell=np.diag([L, L, a_true]), pbc=True)
    atoms.set_array("domain", np.asarray(dom, dtype=np.int64))
    p1 = _polarisation_domain1()
    info = {
        "walls": [{"y_minus_x_A": -0.25 * a_pc}, {"y_minus_x_A": (n / 2 - 0.25) * a_pc}],
        "wall_period_A": L,
        "wall_plane": "{011}: lines y - x = const (mod L) in projection",
        "a_pc_A": a_pc,
        "n_cells": n,
        "polarisation_yx": {1: p1, 2: _rot90(*p1)},
        "c_axis": {1: "y", 2: "x"},
    }
    return _finish(atoms, name="PbTiO3_DW", zone_axis="[100]", thickness_nm=thickness_nm,
                   repeats=repeats, info=info)


_BUILDER_FUNCS = {"LiFePO4": lifepo4, "PbTiO3": pbtio3, "PbTiO3_DW": pbtio3_domain_wall}


def build(name: str, thickness_nm: float | None = None, repeats: Sequence[int] = (1, 1),
          **options: Any) -> ase.Atoms:
    """Build a structure by name ("LiFePO4", "PbTiO3", "PbTiO3_DW"; case-insensitive).

    ``options`` are passed on to the builder (only ``pbtio3_domain_wall`` takes any:
    ``n_cells``, ``a_pc_A``); unknown options raise ``ValueError``.
    """
    key = {k.lower(): k for k in _BUILDER_FUNCS}.get(str(name).lower())
    if key is None:
        raise ValueError(f"unknown structure {name!r}; known: {list(BUILDERS)}")
    allowed = {"PbTiO3_DW": {"n_cells", "a_pc_A"}}.get(key, set())
    bad = set(options) - allowed
    if bad:
        raise ValueError(f"builder {key!r} does not take option(s) {sorted(bad)}; "
                         f"allowed: {sorted(allowed)}")
    return _BUILDER_FUNCS[key](thickness_nm=thickness_nm, repeats=repeats, **options)


# ----------------------------------------------------------------------------- projections
def projected_cell_A(atoms: ase.Atoms) -> tuple[float, float]:
    """Projected cell size ``(Ly, Lx)`` in Å of an orthogonal cell with the beam along z."""
    cell = np.asarray(atoms.cell)
    if cell.shape != (3, 3) or not np.allclose(cell, np.diag(np.diag(cell)), atol=1e-8):
        raise ValueError("expected an orthogonal cell with its axes along x, y, z")
    ly, lx = float(cell[1, 1]), float(cell[0, 0])
    if ly <= 0 or lx <= 0:
        raise ValueError(f"projected cell must have positive size, got (Ly, Lx) = {(ly, lx)}")
    return (ly, lx)


def _composition_key(symbols: Sequence[str]) -> list[str]:
    """Distinct elements ordered by decreasing atomic number."""
    return sorted(set(symbols), key=lambda s: (-atomic_numbers[s], s))


def projected_columns(atoms_or_name: ase.Atoms | str, *,
                      tol_A: float = COLUMN_TOL_A) -> pd.DataFrame:
    """Table of projected atom columns (site table) of a structure viewed along z.

    Parameters
    ----------
    atoms_or_name : ase.Atoms or str
        Atoms from a builder (any thickness/tiling) or a builder name (one cell, default options).
    tol_A : float
        Atoms whose projected (x, y) positions are within ``tol_A`` of each other (single
        linkage, periodic in x and y) form one column.  Default 0.35 Å merges the P/O1 pair of
        LiFePO4 [001] (0.02 Å) and the Ti/O pair of PbTiO3 [100] (0.30 Å); distinct columns in
        these structures are ≥ 1.4 Å apart.

    Returns
    -------
    pandas.DataFrame
        One row per column (each once, positions wrapped into ``[0, L)``), columns ``label``
        (elements by decreasing Z joined by "+"), ``y_A``, ``x_A`` (position of the column's
        heaviest element, averaged if several), ``composition`` (e.g. "P1O1", per beam period),
        ``n_atoms`` (atoms per beam period), ``spread_A`` (largest distance of a member atom from
        the reported position); plus ``domain`` (and ``wall_distance_A``) for the domain-wall
        cell.  Sorted by label, then y, then x.
    """
    if isinstance(atoms_or_name, str):
        atoms = build(atoms_or_name)
    elif isinstance(atoms_or_name, ase.Atoms):
        atoms = atoms_or_name
    else:
        raise ValueError(f"expected ase.Atoms or a structure name, got {type(atoms_or_name)}")
    if not (math.isfinite(tol_A) and tol_A > 0):
        raise ValueError(f"tol_A must be a positive number, got {tol_A}")
    ly, lx = projected_cell_A(atoms)
    if len(atoms) == 0:
        raise ValueError("no atoms")
    nz = int(atoms.info.get("n_repeats_z", 1))
    yx = np.column_stack([atoms.positions[:, 1] % ly, atoms.positions[:, 0] % lx])
    yx[yx[:, 0] >= ly, 0] = 0.0  # guard against x % L == L from rounding
    yx[yx[:, 1] >= lx, 1] = 0.0
    tree = cKDTree(yx, boxsize=(ly, lx))
    pairs = tree.query_pairs(tol_A, output_type="ndarray")
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])),
                       shape=(len(atoms), len(atoms)))
    n_col, col_of = connected_components(graph, directed=False)
    symbols = np.asarray(atoms.get_chemical_symbols())
    domains = atoms.arrays.get("domain")
    box = np.array([ly, lx])
    rows = []
    for k in range(n_col):
        idx = np.flatnonzero(col_of == k)
        syms = symbols[idx]
        order = _composition_key(syms.tolist())
        counts = [int(np.sum(syms == s)) for s in order]
        if any(c % nz for c in counts):
            raise ValueError(f"column with {dict(zip(order, counts, strict=True))} atoms is not "
                             f"a whole number of the {nz} beam periods")
        # unwrap members around the first one, then average the heaviest element
        rel = yx[idx] - yx[idx[0]]
        rel -= np.round(rel / box) * box
        heavy = syms == order[0]
        centre = rel[heavy].mean(axis=0)
        spread = float(np.max(np.hypot(*(rel - centre).T)))
        pos = (yx[idx[0]] + centre) % box
        pos[pos >= box - 1e-9] = 0.0
        row = {
            "label": "+".join(order),
            "y_A": float(pos[0]),
            "x_A": float(pos[1]),
            "composition": "".join(f"{s}{c // nz}" for s, c in zip(order, counts, strict=True)),
            "n_atoms": int(len(idx) // nz),
            "spread_A": spread,
        }
        if domains is not None:
            dom = np.unique(domains[idx])
            if len(dom) != 1:
                raise ValueError("a projected column mixes atoms of two domains")
            row["domain"] = int(dom[0])
        rows.append(row)
    df = pd.DataFrame(rows)
    if "walls" in atoms.info:
        df["wall_distance_A"] = wall_distance_A(df["y_A"].to_numpy(), df["x_A"].to_numpy(), atoms)
    df = df.sort_values(["label", "y_A", "x_A"], kind="stable").reset_index(drop=True)
    return df


def atom_columns(atoms: ase.Atoms, *, tol_A: float = COLUMN_TOL_A) -> tuple[np.ndarray, np.ndarray]:
    """Projected column of every atom, grouped as in :func:`projected_columns`.

    Returns
    -------
    column : ndarray (n_atoms,) int
        Column index of each atom (columns of the whole slab: every lateral repeat separately).
    label : ndarray (n_atoms,) str
        Label of the atom's column ("Li", "P+O", "Ti+O", ...; elements by decreasing Z).
    """
    if not (math.isfinite(tol_A) and tol_A > 0):
        raise ValueError(f"tol_A must be a positive number, got {tol_A}")
    ly, lx = projected_cell_A(atoms)
    yx = np.column_stack([atoms.positions[:, 1] % ly, atoms.positions[:, 0] % lx])
    yx[yx[:, 0] >= ly, 0] = 0.0
    yx[yx[:, 1] >= lx, 1] = 0.0
    pairs = cKDTree(yx, boxsize=(ly, lx)).query_pairs(tol_A, output_type="ndarray")
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])),
                       shape=(len(atoms), len(atoms)))
    n_col, col_of = connected_components(graph, directed=False)
    symbols = np.asarray(atoms.get_chemical_symbols())
    names = np.empty(n_col, dtype=object)
    for k in range(n_col):
        names[k] = "+".join(_composition_key(symbols[col_of == k].tolist()))
    return col_of.astype(np.int64), names[col_of].astype(str)


def species_keep_mask(atoms: ase.Atoms, label: str, occupancy: float, *, seed: int,
                      mode: str = "depth", tol_A: float = COLUMN_TOL_A) -> np.ndarray:
    """Which atoms to keep for a structure variant with column type ``label`` at ``occupancy``.

    The lattice is unchanged; only atoms of the columns labelled ``label`` (all their atoms,
    e.g. Ti and O of a "Ti+O" column) are removed.

    Parameters
    ----------
    atoms : ase.Atoms
        A built structure (beam along z, ``info["beam_period_A"]`` set by the builders).
    label : str
        Column label from :func:`projected_columns` ("Li", "O", "Ti+O", ...).
    occupancy : float in [0, 1]
        1 keeps everything, 0 empties every such column.
    seed : int
        Seed of the random choice (partial occupancy).
    mode : {"depth", "columns"}
        Partial occupancy. ``"depth"``: every column keeps the fraction ``occupancy`` of its
        beam periods, chosen at random within consecutive blocks of ``B`` periods (``B`` the
        smallest denominator with ``occupancy * B`` whole, at most 20), so every column holds
        the same occupancy at every thickness that is a multiple of ``B`` periods and a
        one-cell scan stays representative of the field. ``"columns"``: each period of each
        column is kept with probability ``occupancy`` independently, so the occupancy varies
        from column to column (needs a multi-cell scan to be meaningful).

    Returns
    -------
    ndarray (n_atoms,) bool
    """
    from fractions import Fraction

    x = float(occupancy)
    if not (math.isfinite(x) and 0.0 <= x <= 1.0):
        raise ValueError(f"occupancy must be in [0, 1], got {occupancy!r}")
    if mode not in ("depth", "columns"):
        raise ValueError(f"mode must be 'depth' or 'columns', got {mode!r}")
    col, lab = atom_columns(atoms, tol_A=tol_A)
    target = lab == str(label)
    if not target.any():
        raise ValueError(f"no column labelled {label!r} (labels: {sorted(set(lab.tolist()))})")
    keep = np.ones(len(atoms), bool)
    if x == 1.0:
        return keep
    if x == 0.0:
        keep[target] = False
        return keep
    period = float(atoms.info.get("beam_period_A", atoms.cell[2, 2]))
    layer = np.floor(atoms.positions[:, 2] / period + 1e-9).astype(np.int64)
    rng = np.random.default_rng([int(seed), 9001])
    frac = Fraction(x).limit_denominator(20)
    block = frac.denominator
    n_keep = frac.numerator
    for c in np.unique(col[target]):
        members = np.flatnonzero(col == c)
        layers = np.unique(layer[members])
        if mode == "columns":
            kept_layers = layers[rng.random(layers.size) < x]
        else:
            kept = []
            for b0 in range(0, layers.size, block):
                blk = layers[b0:b0 + block]
                k = n_keep if blk.size == block else int(round(x * blk.size))
                kept.extend(rng.choice(blk, size=k, replace=False).tolist())
            kept_layers = np.asarray(kept, np.int64)
        keep[members] = np.isin(layer[members], kept_layers)
    return keep


def wall_distance_A(y_A: np.ndarray, x_A: np.ndarray, atoms: ase.Atoms) -> np.ndarray:
    """Perpendicular distance (Å, ≥ 0) from points to the nearest domain wall of a DW cell.

    Uses ``atoms.info["walls"]`` (lines ``y - x = const``, periodic with ``wall_period_A``;
    with lateral repeats the walls repeat with the same period).
    """
    if "walls" not in atoms.info:
        raise ValueError("atoms carry no domain walls (atoms.info['walls'])")
    period = float(atoms.info["wall_period_A"])
    s = np.asarray(y_A, dtype=float) - np.asarray(x_A, dtype=float)
    best = np.full(s.shape, np.inf)
    for wall in atoms.info["walls"]:
        t = (s - float(wall["y_minus_x_A"])) % period
        best = np.minimum(best, np.minimum(t, period - t))
    return best / math.sqrt(2.0)


# ----------------------------------------------------------------------------- scans
def _pair(value: float | Sequence[float], what: str) -> tuple[float, float]:
    if np.ndim(value) == 0:
        v = (float(value), float(value))  # type: ignore[arg-type]
    else:
        vals = [float(v) for v in value]  # type: ignore[union-attr]
        if len(vals) != 2:
            raise ValueError(f"{what} must be a number or a pair (y, x), got {value!r}")
        v = (vals[0], vals[1])
    if not all(math.isfinite(t) and t > 0 for t in v):
        raise ValueError(f"{what} must be positive and finite, got {value!r}")
    return v


def scan_grid(cell_A: Sequence[float], step_A_target: float | Sequence[float]
              ) -> tuple[int, int, float, float]:
    """Periodic one-cell scan whose step divides the projected cell exactly.

    ``n = ceil(L / step_target)`` (with a 1e-9 relative slack, so an exact divisor is kept),
    ``step = L / n`` ≤ the target; probe positions ``0, step, ..., (n-1) step`` (the far edge is
    the next cell's origin).  LiFePO4 [001] at 0.4 Å: (ny, nx) = (16, 26) (b = 6.01 Å along y,
    a = 10.33 Å along x); PbTiO3 [100] at 0.3 Å: (14, 14).

    Parameters
    ----------
    cell_A : (Ly, Lx)
        Projected cell (Å), e.g. from :func:`projected_cell_A`.
    step_A_target : float or (float, float)
        Largest acceptable step (Å), the same or per axis (y, x).

    Returns
    -------
    (ny, nx, step_y, step_x)
    """
    ly, lx = _pair(cell_A, "cell_A")
    sy, sx = _pair(step_A_target, "step_A_target")
    ny = max(1, math.ceil(ly / sy * (1 - 1e-9)))
    nx = max(1, math.ceil(lx / sx * (1 - 1e-9)))
    return ny, nx, ly / ny, lx / nx


def scan_from_config(scan: dict[str, Any], cell_A: Sequence[float]) -> dict[str, Any]:
    """Probe grid for a config ``structures.<name>.scan`` entry (see the schema).

    Parameters
    ----------
    scan : dict
        ``{"step_A": float, "region": "cell" | {"y_A": [y0, y1], "x_A": [x0, x1]}}``
        (region defaults to "cell").
    cell_A : (Ly, Lx)
        Projected cell of the built structure (Å).

    Returns
    -------
    dict
        ``shape`` (ny, nx), ``step_A`` (step_y, step_x), ``origin_A`` (y0, x0) of the first
        probe, ``periodic`` (True for a one-cell scan).  Region "cell": :func:`scan_grid`
        (step divides the cell, origin 0).  Explicit region: the step as given, probes at
        ``start + k*step`` for all k with ``start + k*step <= end`` (1e-9 Å slack).
    """
    if not isinstance(scan, dict) or "step_A" not in scan:
        raise ValueError(f"scan must be a mapping with step_A, got {scan!r}")
    unknown = set(scan) - {"step_A", "region"}
    if unknown:
        raise ValueError(f"unknown scan key(s) {sorted(unknown)}")
    region = scan.get("region", "cell")
    if region == "cell":
        ny, nx, sy, sx = scan_grid(cell_A, scan["step_A"])
        return {"shape": (ny, nx), "step_A": (sy, sx), "origin_A": (0.0, 0.0), "periodic": True}
    (y0, y1), (x0, x1) = _region(region)
    sy, sx = _pair(scan["step_A"], "step_A")
    ny = int(math.floor((y1 - y0) / sy + 1e-9)) + 1
    nx = int(math.floor((x1 - x0) / sx + 1e-9)) + 1
    return {"shape": (ny, nx), "step_A": (sy, sx), "origin_A": (y0, x0), "periodic": False}


def _region(region_A: Any) -> tuple[tuple[float, float], tuple[float, float]]:
    if isinstance(region_A, dict):
        if set(region_A) != {"y_A", "x_A"}:
            raise ValueError(f"region dict needs exactly keys y_A and x_A, got {sorted(region_A)}")
        region_A = (region_A["y_A"], region_A["x_A"])
    try:
        (y0, y1), (x0, x1) = ((float(a), float(b)) for a, b in region_A)
    except (TypeError, ValueError):
        raise ValueError(f"region_A must be ((y0, y1), (x0, x1)) in Å, got {region_A!r}") from None
    if not all(map(math.isfinite, (y0, y1, x0, x1))) or y1 < y0 or x1 < x0:
        raise ValueError(f"region_A must be finite with y0 <= y1 and x0 <= x1, got {region_A!r}")
    return (y0, y1), (x0, x1)


def sites_in_region(sites: pd.DataFrame, cell_A: Sequence[float], region_A: Any, *,
                    margin_A: float = 0.0) -> pd.DataFrame:
    """Tile a periodic site table over a field of view.

    Parameters
    ----------
    sites : DataFrame
        Site table of one projected cell (positions in ``[0, L)``), e.g. from
        :func:`projected_columns`.
    cell_A : (Ly, Lx)
        Period of the table (Å).
    region_A : ((y0, y1), (x0, x1)) or {"y_A": [y0, y1], "x_A": [x0, x1]}
        Field of view in the same absolute frame (Å); closed interval.
    margin_A : float
        Also keep sites up to this distance outside the region (for templates/signals whose
        footprint reaches into the field of view).

    Returns
    -------
    DataFrame
        All periodic images inside the (expanded) region, absolute coordinates, with the
        original columns plus ``tile_y``, ``tile_x`` (the cell image indices); sorted by y, x.
        Subtract ``(y0, x0)`` to get coordinates relative to the first probe.
    """
    ly, lx = _pair(cell_A, "cell_A")
    (y0, y1), (x0, x1) = _region(region_A)
    m = float(margin_A)
    if not math.isfinite(m) or m < 0:
        raise ValueError(f"margin_A must be >= 0, got {margin_A}")
    for col in ("y_A", "x_A"):
        if col not in sites.columns:
            raise ValueError(f"site table lacks column {col!r}")
    y0, y1, x0, x1 = y0 - m, y1 + m, x0 - m, x1 + m
    eps = 1e-9
    iy = range(math.floor((y0 - ly) / ly), math.ceil(y1 / ly) + 1)
    ix = range(math.floor((x0 - lx) / lx), math.ceil(x1 / lx) + 1)
    parts = []
    for ty in iy:
        for tx in ix:
            t = sites.copy()
            t["y_A"] = t["y_A"] + ty * ly
            t["x_A"] = t["x_A"] + tx * lx
            keep = ((t["y_A"] >= y0 - eps) & (t["y_A"] <= y1 + eps)
                    & (t["x_A"] >= x0 - eps) & (t["x_A"] <= x1 + eps))
            t = t[keep]
            if len(t):
                t["tile_y"] = ty
                t["tile_x"] = tx
                parts.append(t)
    if not parts:
        out = sites.iloc[0:0].copy()
        out["tile_y"] = pd.Series(dtype=np.int64)
        out["tile_x"] = pd.Series(dtype=np.int64)
        return out
    out = pd.concat(parts, ignore_index=True)
    return out.sort_values(["y_A", "x_A"], kind="stable").reset_index(drop=True)
