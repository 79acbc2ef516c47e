"""`fedtiny export` and `fedtiny infer`: ship a finished run's tiny model and check it on a test set.

Thin wiring: the work is in `shared.export` (only its public names are used here).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from shared import rundir


def _export(args: argparse.Namespace) -> int:
    from shared import export

    result = export.export(args.output_dir, args.format, args.out, compact_model=args.compact, float16=args.float16)
    print(
        f"wrote {args.out}: {result['bytes']} bytes = {result['ratio']:.4f} of the dense float32 state dict "
        f"({result['dense_bytes']} bytes); channels removed: {result['channels_removed']}"
    )
    return 0


def _infer(args: argparse.Namespace) -> int:
    import torch

    from shared import export
    from shared.data import batches, load_dataset

    torch.set_num_threads(1)
    bundle = load_dataset(args.dataset, args.dataset_path, args.seed, args.test_fraction)
    test = batches(bundle, bundle.x_test, bundle.y_test, args.batch_size, shuffle=False, seed=0)
    x, _ = next(iter(test))
    print(f"dataset={args.dataset} test examples={len(bundle.y_test)} batch_size={len(x)} threads=1")
    for path in args.models:
        fmt, predict = export.load_predictor(path)
        acc, count = export.accuracy(predict, test)
        ms = export.latency_ms(predict, x, repeats=args.repeats)
        print(f"{path}: format={fmt} bytes={Path(path).stat().st_size} accuracy={acc:.4f} "
              f"latency_ms_per_batch={ms:.3f} (median of {args.repeats})")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add the `export` and `infer` subcommands to the `fedtiny` parser (torch is imported only when they run)."""
    ex = subparsers.add_parser("export", help="export a finished run's model (packed, onnx, torchscript)")
    ex.add_argument("output_dir", help=f"output directory of a finished run ({rundir.CONFIG}, {rundir.MODEL})")
    ex.add_argument("--format", default="packed", help="packed | onnx | torchscript")
    ex.add_argument("--compact", action="store_true", help="remove channels and neurons that cannot change the logits")
    ex.add_argument("--float16", action="store_true", help="packed only: store kept weights as float16")
    ex.add_argument("--out", required=True, help="file to write (.ftc, .onnx, .pt)")
    ex.set_defaults(func=_export)

    inf = subparsers.add_parser("infer", help="accuracy and CPU latency of exported models on a test split")
    inf.add_argument("models", nargs="+", metavar="MODEL", help="exported files, timed in one process")
    inf.add_argument("--dataset", required=True, help="dataset name (as in dataset.name)")
    inf.add_argument("--dataset-path", default="", help="dataset location (default: the dataset's own)")
    inf.add_argument("--seed", type=int, default=0, help="the run's seed (digits draws its test split with it)")
    inf.add_argument("--test-fraction", type=float, default=0.2, help="the run's dataset.test_fraction")
    inf.add_argument("--batch-size", type=int, default=64)
    inf.add_argument("--repeats", type=int, default=20, help="timed batches for the median latency")
    inf.set_defaults(func=_infer)
