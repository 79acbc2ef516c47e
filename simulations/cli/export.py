"""`fedtiny export` and `fedtiny infer`: ship a finished run's tiny model and check it on a test set.

Thin wiring: the work is in `shared.export` (only its public names are used here). `infer` takes
the test split (dataset, path, seed, test fraction) from what its models record, a run
directory's config or an exported file's metadata; flags override, except that a `--dataset`
contradicting a recorded one is refused.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from shared import rundir
from shared.config import ConfigError
from simulations.cli.commands import help_for


def _export(args: argparse.Namespace) -> int:
    from shared import export

    result = export.export(args.output_dir, args.format, args.out, compact_model=args.compact, float16=args.float16)
    print(
        f"wrote {args.out} ({result['format']}): {result['bytes']} bytes = {result['ratio']:.4f} of the dense "
        f"float32 state dict ({result['dense_bytes']} bytes); channels removed: {result['channels_removed']}"
    )
    return 0


def _recorded(path: str) -> dict[str, Any]:
    """The data settings a run directory's config or an exported file's metadata records (may be empty)."""
    from shared import export

    if Path(path).is_dir():
        data = export.run_data(path)
        if not data.get("dataset") and (Path(path) / rundir.MODEL_SPEC).is_file():
            spec = export.read_spec(path)
            data = {"dataset": spec.get("dataset"), "seed": spec.get("seed")}
        return data
    meta = export.read_metadata(path) or {}
    return {k: meta.get(k) for k in (*export.DATA_KEYS, "input_shape", "num_classes")}


def _agreed(records: dict[str, dict[str, Any]], key: str, hint: str) -> Any:
    """The one value the models record for `key` (None when none does); differing values are a ConfigError."""
    values = {path: r[key] for path, r in records.items() if r.get(key) is not None}
    if len(set(map(str, values.values()))) > 1:
        listed = ", ".join(f"{v} ({p})" for p, v in values.items())
        raise ConfigError(f"the models record different {key} values: {listed}; {hint}")
    return next(iter(values.values()), None)


def data_settings(args: argparse.Namespace, records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """dataset, path, seed, test_fraction and trusted packages for `infer`: flags over recorded values
    (trusted packages come from `--trust` flags alone)."""
    if args.dataset is not None:
        for path, r in records.items():
            if r.get("dataset") not in (None, args.dataset):
                raise ConfigError(f"--dataset {args.dataset} contradicts {path}, which records dataset {r['dataset']}")
        dataset = args.dataset
    else:
        dataset = _agreed(records, "dataset", "infer them separately")
        if dataset is None:
            raise ConfigError(f"no dataset recorded in {', '.join(records)}; pass --dataset")
    seed = args.seed if args.seed is not None else _agreed(records, "seed", "pass --seed to choose")
    fraction = args.test_fraction if args.test_fraction is not None else _agreed(
        records, "test_fraction", "pass --test-fraction to choose")
    path = args.dataset_path if args.dataset_path is not None else _agreed(
        records, "dataset_path", "pass --dataset-path to choose")
    trusted = list(args.trust or ())  # from the command line only, never from a run folder or file
    return {"dataset": dataset, "path": path or "", "seed": 0 if seed is None else int(seed),
            "test_fraction": 0.2 if fraction is None else float(fraction), "trusted": trusted}


def _check_fits(path: str, record: dict[str, Any], predict, bundle, x, dataset: str) -> None:
    """Refuse a model whose recorded or actual input shape or class count does not match the data."""
    shape, classes = tuple(bundle.input_shape), bundle.num_classes
    if record.get("input_shape") is not None and tuple(record["input_shape"]) != shape:
        raise ConfigError(f"{path} takes inputs {tuple(record['input_shape'])}, but {dataset} images are {shape}")
    if record.get("num_classes") is not None and int(record["num_classes"]) != classes:
        raise ConfigError(f"{path} has {record['num_classes']} classes, but {dataset} has {classes}")
    try:
        logits = predict(x[:1])
    except Exception as exc:  # any runtime's shape error: report it as a mismatch with the data
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"{path} cannot run on {dataset} images {shape}: {first}") from None
    if tuple(logits.shape) != (1, classes):
        raise ConfigError(f"{path} gives {tuple(logits.shape[1:])} logits, but {dataset} has {classes} classes")


def _infer(args: argparse.Namespace) -> int:
    import torch

    from shared import export
    from shared.data import batches, load_dataset

    torch.set_num_threads(1)
    records = {path: _recorded(path) for path in args.models}
    data = data_settings(args, records)
    bundle = load_dataset(data["dataset"], data["path"], data["seed"], data["test_fraction"], data["trusted"])
    test = batches(bundle, bundle.x_test, bundle.y_test, args.batch_size, shuffle=False, seed=0)
    x, _ = next(iter(test))
    predictors = {path: export.load_predictor(path) for path in args.models}
    for path, (_, predict) in predictors.items():
        _check_fits(path, records[path], predict, bundle, x, data["dataset"])
    print(f"dataset={data['dataset']} seed={data['seed']} test_fraction={data['test_fraction']} "
          f"test examples={len(bundle.y_test)} batch_size={len(x)} threads=1")
    for path, (fmt, predict) in predictors.items():
        acc, _ = export.accuracy(predict, test)
        ms = export.latency_ms(predict, x, repeats=args.repeats)
        size = Path(path).stat().st_size if Path(path).is_file() else (Path(path) / rundir.MODEL).stat().st_size
        print(f"{path}: format={fmt} bytes={size} accuracy={acc:.4f} "
              f"latency_ms_per_batch={ms:.3f} (median of {args.repeats})")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add the `export` and `infer` subcommands to the `fedtiny` parser (torch is imported only when they run)."""
    ex = subparsers.add_parser("export", help=help_for("export"))
    ex.add_argument("output_dir", help=f"output directory of a finished run ({rundir.CONFIG}, {rundir.MODEL})")
    ex.add_argument("--format", default=None, help="packed | onnx | torchscript | c (default: from the --out suffix)")
    ex.add_argument("--compact", action="store_true", help="remove channels and neurons that cannot change the logits")
    ex.add_argument("--float16", action="store_true", help="packed only: store kept weights as float16")
    ex.add_argument("--out", required=True, help="file to write: .ftc (packed), .onnx, .pt (torchscript), .h (c)")
    ex.set_defaults(func=_export)

    inf = subparsers.add_parser("infer", help=help_for("infer"))
    inf.add_argument("models", nargs="+", metavar="RUN_DIR|MODEL",
                     help="run directories or exported files, timed in one process")
    inf.add_argument("--dataset", default=None, help="dataset name (default: what the models record)")
    inf.add_argument("--dataset-path", default=None,
                     help="dataset location (default: the run's, else the dataset's own)")
    inf.add_argument("--seed", type=int, default=None, help="split seed (default: the recorded one, else 0)")
    inf.add_argument("--test-fraction", type=float, default=None,
                     help="dataset.test_fraction (default: the recorded one, else 0.2)")
    inf.add_argument("--trust", action="append", metavar="PACKAGE",
                     help="trust this package's code for a package.module:loader --dataset (repeatable); "
                          "a run folder's own trusted list is never used")
    inf.add_argument("--batch-size", type=int, default=64)
    inf.add_argument("--repeats", type=int, default=20, help="timed batches for the median latency")
    inf.set_defaults(func=_infer)
