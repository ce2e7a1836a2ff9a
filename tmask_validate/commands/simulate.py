"""``tmask-validate simulate`` and ``tmask-validate combine``: abTEM ground-truth stores.

Examples::

    tmask-validate simulate --config config/smoke.yaml --structure LiFePO4_001 \\
        --out results/simulate/LiFePO4_001.zarr
    tmask-validate simulate --config config/paper.yaml --structure LiFePO4_001 \\
        --configurations 0:5 --out results/simulate/LiFePO4_001/0-5.zarr
    tmask-validate combine results/simulate/LiFePO4_001/*.zarr \\
        --out results/simulate/LiFePO4_001.zarr
"""

from __future__ import annotations

import argparse
import time


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _simulate(args: argparse.Namespace) -> int:
    from tmask_validate import simulate
    from tmask_validate.config import load_config

    config = load_config(args.config)
    variant = None
    if args.variant:
        from tmask_validate.evidence import variants_from_config

        variants = variants_from_config(config, args.structure)
        if args.variant not in variants:
            raise ValueError(f"unknown evidence variant {args.variant!r} of {args.structure} "
                             f"(have {sorted(variants)})")
        variant = variants[args.variant]
    t0 = time.perf_counter()
    out = simulate.simulate_structure(
        config, args.structure, args.out, configurations=args.configurations,
        progress=not args.quiet, variant=variant,
        block_bytes=None if args.block_mb is None else int(args.block_mb * 2**20),
        keep_checkpoint=args.keep_checkpoint,
    )
    print(f"wrote {out} ({time.perf_counter() - t0:.1f} s)")
    return 0


def _combine(args: argparse.Namespace) -> int:
    from tmask_validate import simulate

    out = simulate.combine_stores(args.inputs, args.out)
    print(f"wrote {out} (combined {len(args.inputs)} stores)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``simulate`` and ``combine`` subcommands."""
    p = subparsers.add_parser(
        "simulate", help="simulate 4D-STEM data of one structure with abTEM (zarr store)",
        description="Frozen-phonon multislice simulation of one structure of a config: "
        "4D data at every thickness of the series plus the conventional annular detector "
        "images, written atomically to a zarr store. Resumable: finished phonon "
        "configurations are kept in <out>.partial/ until the store is written. The scan "
        "runs in blocks of rows and the mean streams to disk, so memory stays bounded.",
    )
    p.add_argument("--config", required=True, help="config YAML (e.g. config/smoke.yaml)")
    p.add_argument("--structure", required=True, help="key of the structures section")
    p.add_argument("--configurations", default=None, metavar="I:J",
                   help="only phonon configurations I..J-1 (combine the chunks afterwards)")
    p.add_argument("--variant", default=None, metavar="NAME",
                   help="a species-evidence variant of the structure (evidence section), e.g. "
                   "crystal, Li-x0 (Li columns emptied), Li-x0.5")
    p.add_argument("--out", required=True, help="output zarr store")
    p.add_argument("--block-mb", type=_positive_float, default=None, metavar="MB",
                   help="largest float32 output of one scan block in MiB (default 512): "
                   "memory holds one block, not the whole scan")
    p.add_argument("--keep-checkpoint", action="store_true",
                   help="keep <out>.partial/ (every configuration's own result) after success")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_simulate)

    c = subparsers.add_parser(
        "combine", help="combine phonon-chunk stores (weighted mean by n_configurations)",
        description="Weighted mean of simulation stores of the same structure and config "
        "that hold disjoint frozen-phonon configurations.",
    )
    c.add_argument("inputs", nargs="+", help="chunk stores")
    c.add_argument("--out", required=True, help="combined zarr store")
    c.set_defaults(func=_combine)
