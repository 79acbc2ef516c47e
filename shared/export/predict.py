"""Running an exported file: a predictor for any format, its accuracy and its CPU latency."""

from __future__ import annotations

import math
import os
import statistics
import time
import warnings
from typing import Callable, Iterable

import numpy as np
import torch

from shared.export.formats import detect_format, load_packed

Predictor = Callable[[torch.Tensor], torch.Tensor]


def load_predictor(path: str | os.PathLike) -> tuple[str, Predictor]:
    """(format, function from an input batch to logits) for an exported file or a run directory, CPU, one thread.

    A run directory gives its in-framework model ("run"); a C header is compiled with the
    reference runtime and run as a process per batch ("c").
    """
    if os.path.isdir(path):
        from shared.export.spec import load_run

        return "run", _no_grad(load_run(path)[0])
    fmt = detect_format(path)
    if fmt == "c":
        return fmt, _c_predictor(path)
    if fmt == "packed":
        model = load_packed(path)
        return fmt, _no_grad(model)
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = torch.jit.load(str(path), map_location="cpu").eval()
        return fmt, _no_grad(model)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def predict(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.numpy().astype(np.float32, copy=False)})[0])

    return fmt, predict


def _c_predictor(path: str | os.PathLike) -> Predictor:
    import tempfile

    from shared.export.c_build import build, run_binary

    workdir = tempfile.TemporaryDirectory(prefix="fedtiny-c-")
    binary = build(path, workdir.name)

    def predict(x: torch.Tensor) -> torch.Tensor:
        return run_binary(binary, x)

    predict.workdir = workdir  # the binary's folder lives as long as the predictor
    return predict


def _no_grad(model: Callable[[torch.Tensor], torch.Tensor]) -> Predictor:
    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    return predict


def accuracy(predict: Predictor, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, int]:
    """(top-1 accuracy, example count) of `predict` over (x, y) batches."""
    correct = count = 0
    for x, y in batches:
        correct += int((predict(x).argmax(dim=1) == y).sum())
        count += len(y)
    return (correct / count if count else math.nan), count


def latency_ms(predict: Predictor, x: torch.Tensor, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time in ms of `predict(x)` over `repeats` timed calls, after `warmup` calls."""
    for _ in range(warmup):
        predict(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        predict(x)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
