"""The `device` key and GPUs in simulation: selection, refusal without CUDA, Flower's client resources.

These run on CPU-only machines (CI); the GPU itself is checked by simulations/gpu_check.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from shared.config import Config, ConfigError, SimulationConfig, load_config
from shared.data import batches, load_dataset
from shared.device import DeviceBatches, DeviceError, on_device, resolve
from simulations.cli.launch import federation_config, flower_env
from simulations.cli.main import main as cli_main

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


def test_cpu_is_the_cpu():
    assert resolve("cpu") == torch.device("cpu")


@needs_no_cuda
def test_auto_without_cuda_is_the_cpu():
    assert resolve("auto") == torch.device("cpu")
    assert load_config(overrides=["device=auto"]).device == "auto"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_with_cuda_is_the_gpu():
    assert resolve("auto").type == "cuda"


@needs_no_cuda
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_is_refused_in_one_line(name):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[f"device={name}"])
    message = str(info.value)
    assert "'device'" in message and "no CUDA GPU" in message and "\n" not in message


@needs_no_cuda
def test_cli_exits_2_on_cuda_without_cuda(capsys):
    assert cli_main(["run", "device=cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedtiny: ") and "device" in err and "CUDA" in err and "\n" not in err


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:x", "CPU", "mps"])
def test_malformed_device_names_are_refused(name):
    with pytest.raises(DeviceError, match="auto, cpu, cuda or cuda:N"):
        resolve(name)


@needs_no_cuda
def test_gpus_per_client_without_a_gpu_is_refused():
    with pytest.raises(ConfigError, match="simulation.gpus_per_client.*no CUDA GPU"):
        load_config(overrides=["simulation.gpus_per_client=0.25"])


@pytest.mark.parametrize("value", [-0.5, 1.5])
def test_gpus_per_client_must_be_a_fraction_or_whole(value):
    with pytest.raises(ConfigError, match="simulation.gpus_per_client"):
        load_config(overrides=[f"simulation.gpus_per_client={value}"])


def test_gpus_per_client_reaches_flowers_client_resources():
    # Built without validation: this machine has no GPU, the launcher's job is only to pass the share on.
    config = dataclasses.replace(Config(), simulation=SimulationConfig(gpus_per_client=0.25, num_cpus=8))
    parts = dict(item.split("=") for item in federation_config(config).split())
    assert parts["client-resources-num-gpus"] == "0.25"
    assert parts["client-resources-num-cpus"] == "1" and parts["init-args-num-cpus"] == "8"


def test_no_gpu_share_by_default():
    assert "num-gpus" not in federation_config(load_config())


def test_clients_that_reserve_no_gpu_still_see_the_gpus(tmp_path):
    # Ray blanks CUDA_VISIBLE_DEVICES for actors with num_gpus=0 unless told otherwise.
    assert flower_env(tmp_path, 1234)["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] == "0"


def test_device_batches_are_the_cpu_batches_in_the_same_order():
    bundle = load_dataset("digits")
    x, y = bundle.x_train[:150], bundle.y_train[:150]
    xs, ys = on_device(next(iter(batches(bundle, x, y, len(x), False, 0)))[0], y, torch.device("cpu"))
    for shuffle, seed in ((True, 3), (True, 1009), (False, 0)):
        cpu = list(batches(bundle, x, y, 32, shuffle, seed))
        dev = list(DeviceBatches(xs, ys, 32, shuffle, seed))
        assert len(dev) == len(cpu) == 5
        for (xa, ya), (xb, yb) in zip(cpu, dev):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not np.array_equal(np.asarray(y), np.asarray(torch.cat([b for _, b in DeviceBatches(xs, ys, 32, True, 3)])))


def test_client_runtime_keeps_the_cpu_path_on_cpu(tmp_path):
    """device=cpu: the client's batches are shared.data's own (the CPU run stays exactly as it was)."""
    from client.runtime import _runtime
    from shared.config import to_flat
    from shared.data import Batches

    flat = tuple(sorted(to_flat(load_config(overrides=["device=cpu", "fl.num_clients=4"])).items()))
    rt = _runtime(flat, 0, 4)
    assert rt.device == torch.device("cpu")
    assert isinstance(rt.train_batches(0)(0), Batches)
    assert next(rt.new_model().parameters()).device == torch.device("cpu")


@needs_no_cuda
def test_gpu_check_exits_2_with_one_line_without_cuda(capsys):
    from simulations.gpu_check import main as gpu_check

    assert gpu_check(["--skip-regime"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "no CUDA GPU" in captured.err
