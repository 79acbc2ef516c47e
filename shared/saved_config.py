"""A run folder's saved config, read without the trust it names.

Why: a run folder travels (someone sends one, a shared disk holds one), so its `config.yaml` is
whoever wrote it. Its `trusted` list names the packages whose code a `package.module:name` may
import; honouring it would let a folder run code as whoever resumes, scores or infers it. So a
saved config is read with `trusted` set by the person at the keyboard (`trusted=...` on the
command line, `--trust` flags), never by the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from shared import rundir
from shared.config import Config, load_config

UNTRUSTED = "trusted=[]"  # the override that drops a saved config's own trusted list


def load_saved(run_dir: str | os.PathLike, overrides: Iterable[str] = ()) -> Config:
    """The validated config in `run_dir`/config.yaml with its `trusted` list replaced by the one in
    `overrides` (empty when they set none); the other overrides apply as usual."""
    return load_config(Path(run_dir) / rundir.CONFIG, [UNTRUSTED, *overrides])

