"""What the plain server and client share: fedtiny's validated config, data and model."""

from __future__ import annotations

from functools import lru_cache

import torch

from shared.config import Config, load_config
from shared.data import DataBundle, load_for
from shared.models import build_model


@lru_cache(maxsize=4)
def config_and_data(config_file: str) -> tuple[Config, DataBundle]:
    torch.set_num_threads(1)
    config = load_config(config_file)
    return config, load_for(config)


def new_model(config: Config, bundle: DataBundle) -> torch.nn.Module:
    c = config.model
    return build_model(c.name, bundle.num_classes, bundle.input_shape, c.width, config.seed)
