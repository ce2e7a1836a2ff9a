"""``tmask-validate noise``: Poisson (electron-dose) noise on a noiseless simulation store.

Example::

    tmask-validate noise results/simulate/LiFePO4_001.zarr --dose 1e5 --seed 3 \\
        --out results/noise/LiFePO4_001/dose_1e+05.zarr
"""

from __future__ import annotations

import argparse


def _noise(args: argparse.Namespace) -> int:
    from tmask_validate import simulate

    out = simulate.noise_store(args.input, args.out, dose_e_per_A2=args.dose, seed=args.seed)
    print(f"wrote {out} (dose {args.dose:g} e-/Å², seed {args.seed})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``noise`` subcommand."""
    p = subparsers.add_parser(
        "noise", help="add seeded Poisson dose noise to a simulation store",
        description="Expected counts per pattern = dose x step_y x step_x x (fraction of "
        "the probe intensity on the detector); stored as uint32 counts in the same layout, "
        "attrs dose_e_per_A2, electrons_per_probe, noise_seed.",
    )
    p.add_argument("input", help="noiseless simulation store")
    p.add_argument("--dose", type=float, required=True, metavar="E_PER_A2",
                   help="electron dose (e-/Å²)")
    p.add_argument("--seed", type=int, required=True, help="noise seed (>= 0)")
    p.add_argument("--out", required=True, help="output zarr store")
    p.set_defaults(func=_noise)
