"""Compiling an exported C model header with the runtime, and running the binary.

A header is code: only one that `c_reader.check_header` accepts is compiled (see `build`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import torch

from shared.export.c_export import MAIN_FILE, RUNTIME_DIR
from shared.export.c_reader import check_header


def build(header: str | os.PathLike, workdir: str | os.PathLike) -> Path:
    """Compile `fedtiny_main.c` + the runtime with `header` into `workdir`/fedtiny_infer; returns the binary.

    A header is code, so only one that `c_reader.check_header` finds to be exactly what this module
    writes, with in-bounds arrays, is compiled, from the checked copy in `workdir`. Uses $CC or cc;
    a refused header, a missing compiler or a failed build is one ValueError line.
    """
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise ValueError(f"no C compiler {cc!r} on PATH (set CC)")
    binary = Path(workdir) / "fedtiny_infer"
    text = check_header(header)
    header = Path(workdir).resolve() / "model.h"
    header.write_text(text)
    command = [cc, "-O2", "-std=c99", "-Wall", "-Werror", f"-I{RUNTIME_DIR}", f'-DFEDTINY_MODEL_HEADER="{header}"',
               str(RUNTIME_DIR / MAIN_FILE), str(RUNTIME_DIR / "fedtiny_infer.c"), "-lm", "-o", str(binary)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        first = (done.stderr.strip().splitlines() or ["(no output)"])[0]
        raise ValueError(f"compiling {header.name} failed: {first}")
    return binary


def run_binary(binary: str | os.PathLike, x: torch.Tensor, pixels: bool = False) -> torch.Tensor:
    """Logits of a batch from a `build` binary: inputs as float32 on stdin, one line of logits per input."""
    data = x.detach().float().contiguous().numpy().astype("<f4").tobytes()
    done = subprocess.run([str(binary), *(["--pixels"] if pixels else [])], input=data, capture_output=True,
                          check=True)
    rows = [list(map(float, line.split())) for line in done.stdout.decode().splitlines()]
    return torch.tensor(rows, dtype=torch.float32)
