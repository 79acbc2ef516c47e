"""Specification of edge export: every format and compaction give the run's logits; compaction removes channels."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from shared import codec, data, export, rundir
from shared.config import load_config, to_yaml
from shared.data import DataBundle, batches, load_dataset, to_tensor
from shared.models import build_model
from shared.pruning.params import prunable_names
from simulations.cli import main

NAME, WIDTH, SHAPE, CLASSES = "cnn", 0.25, (1, 8, 8), 10
SUFFIX = {"packed": ".ftc", "onnx": ".onnx", "torchscript": ".pt"}


def sparse_cnn() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A cnn at width 0.25 (conv 1-8-16-16, linear 16-32-10) with random BN statistics and 70% masks,
    plus hand-made structure:

    - features.0 channel 1: all weights pruned, relu(BN) == 0 -> removable (contributes nothing);
    - features.0 channel 2: all weights pruned, relu(BN) == 1 -> a constant seen through zero padding: kept;
    - features.0 channel 5: features.3 reads nothing from it -> removable;
    - features.7 channel 3: all pruned, relu(BN) == 1 -> constant folded into classifier.0 -> removable;
    - classifier.0 neuron 4: all pruned, relu(BN) == 1 -> folded into classifier.3's bias -> removable;
    - classifier.0 neuron 7: classifier.3 reads nothing from it -> removable.
    """
    model = build_model(NAME, CLASSES, SHAPE, WIDTH, seed=0)
    g = torch.Generator().manual_seed(1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for key in state:
        if key.endswith("running_mean"):
            state[key] = torch.randn(state[key].shape, generator=g) * 0.1
        elif key.endswith("running_var"):
            state[key] = torch.rand(state[key].shape, generator=g) + 0.5
    bn_of = {"features.0": "features.1", "features.7": "features.8", "classifier.0": "classifier.1"}
    for bn in ("features.1", "features.4", "features.8", "classifier.1"):
        state[f"{bn}.weight"] = torch.rand(state[f"{bn}.weight"].shape, generator=g) + 0.5
        state[f"{bn}.bias"] = torch.randn(state[f"{bn}.bias"].shape, generator=g) * 0.5
    masks = {n: torch.rand(state[n].shape, generator=g) < 0.7 for n in prunable_names(model)}

    def dead(layer: str, channel: int, post: float) -> None:
        masks[f"{layer}.weight"][channel] = False
        bn = bn_of[layer]
        state[f"{bn}.running_mean"][channel] = 0.0
        state[f"{bn}.bias"][channel] = post

    dead("features.0", 1, -1.0)
    dead("features.0", 2, 1.0)
    dead("features.7", 3, 1.0)
    dead("classifier.0", 4, 1.0)
    masks["features.3.weight"][:, 5] = False
    masks["classifier.3.weight"][:, 7] = False
    for name, mask in masks.items():
        state[name] = state[name] * mask
    return state, masks


def reference_model(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = build_model(NAME, CLASSES, SHAPE, WIDTH, seed=0)
    model.load_state_dict(state)
    return model.eval()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run's output directory, written by hand: config.yaml + model.ftc.

    It has no model spec (a run from before `write_spec`), so export falls back to loading the dataset.
    """
    out = tmp_path_factory.mktemp("run")
    config = load_config(None, [f"model.name={NAME}", f"model.width={WIDTH}", "dataset.name=digits"])
    (out / "config.yaml").write_text(to_yaml(config))
    state, masks = sparse_cnn()
    codec.save(out / "model.ftc", state, masks)
    return out


@pytest.fixture(scope="module")
def test_inputs() -> torch.Tensor:
    bundle = load_dataset("digits", "", 0, 0.2)
    return torch.cat([x for x, _ in batches(bundle, bundle.x_test, bundle.y_test, 128, shuffle=False, seed=0)])


@pytest.fixture(scope="module")
def reference_logits(test_inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return reference_model(sparse_cnn()[0])(test_inputs)


def run_config(*overrides: str):
    return load_config(None, [f"model.name={NAME}", f"model.width={WIDTH}", "dataset.name=digits", *overrides])


def test_export_of_a_run_with_a_model_spec_never_loads_the_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, test_inputs: torch.Tensor, reference_logits: torch.Tensor
) -> None:
    config = run_config("dataset.path=/nonexistent/dataset")
    (tmp_path / rundir.CONFIG).write_text(to_yaml(config))
    export.write_spec(tmp_path, config, load_dataset("digits", "", 0, 0.2))
    codec.save(tmp_path / rundir.MODEL, *sparse_cnn())

    def unavailable(*args: object, **kwargs: object) -> None:
        raise OSError("the dataset is not available on this machine")

    monkeypatch.setattr(data, "load_dataset", unavailable)
    monkeypatch.setattr(data, "_load_cached", unavailable)
    out = tmp_path / "m.ftc"
    export.export(tmp_path, "packed", out, compact_model=True)
    assert (export.load_packed(out)(test_inputs) - reference_logits).abs().max() <= 1e-4
    (tmp_path / rundir.CONFIG).unlink()  # the spec alone is enough
    model, _, spec = export.load_run(tmp_path)
    assert spec == export.ModelSpec(NAME, CLASSES, SHAPE, WIDTH)


def uint8_bundle() -> DataBundle:
    g = np.random.default_rng(0)
    x = g.integers(0, 256, (20, 3, 4, 4), dtype=np.uint8)
    y = np.arange(20, dtype=np.int64) % 4
    mean, std = data.channel_stats(x)
    return DataBundle(x, y, x[:6].copy(), y[:6].copy(), 4, mean, std)


@pytest.mark.parametrize("kind", ["digits", "uint8"])
def test_model_spec_records_the_architecture_and_the_normalization_the_data_loader_applies(
    tmp_path: Path, kind: str
) -> None:
    bundle = load_dataset("digits", "", 0, 0.2) if kind == "digits" else uint8_bundle()
    spec = json.loads(export.write_spec(tmp_path, run_config("seed=3"), bundle).read_text())
    assert (tmp_path / rundir.MODEL_SPEC).is_file() and export.read_spec(tmp_path) == spec
    assert (spec["model"], spec["width"], spec["seed"], spec["dataset"]) == (NAME, WIDTH, 3, "digits")
    assert spec["num_classes"] == bundle.num_classes and spec["input_shape"] == list(bundle.input_shape)
    norm = spec["normalization"]
    assert norm["mean"] == list(bundle.mean) and norm["std"] == list(bundle.std)
    assert norm["divide_by"] == (255.0 if kind == "uint8" else 1.0)
    raw = bundle.x_test[:5]
    mean = torch.tensor(norm["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(norm["std"]).view(1, -1, 1, 1)
    by_hand = (torch.from_numpy(raw.astype(np.float32)) / norm["divide_by"] - mean) / std
    assert torch.allclose(by_hand, to_tensor(bundle, raw), atol=1e-6)


def test_model_spec_of_another_version_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / rundir.MODEL_SPEC).write_text(json.dumps({"format": export.SPEC_FORMAT, "version": 99}))
    codec.save(tmp_path / rundir.MODEL, *sparse_cnn())
    with pytest.raises(ValueError, match="v99; this build reads fedtiny-model-spec v1"):
        export.load_run(tmp_path)


@pytest.mark.parametrize("compact", [False, True], ids=["full", "compact"])
@pytest.mark.parametrize("fmt", export.FORMATS)
def test_exported_model_gives_the_runs_logits_on_the_test_set(
    run_dir: Path, tmp_path: Path, test_inputs: torch.Tensor, reference_logits: torch.Tensor, fmt: str, compact: bool
) -> None:
    out = tmp_path / f"model{SUFFIX[fmt]}"
    export.export(run_dir, fmt, out, compact_model=compact)
    detected, predict = export.load_predictor(out)
    assert detected == fmt
    assert (predict(test_inputs) - reference_logits).abs().max() <= 1e-4


def test_float16_packed_is_smaller_and_within_stated_tolerance(
    run_dir: Path, tmp_path: Path, test_inputs: torch.Tensor, reference_logits: torch.Tensor
) -> None:
    full = export.export(run_dir, "packed", tmp_path / "f32.ftc")
    half = export.export(run_dir, "packed", tmp_path / "f16.ftc", float16=True)
    with torch.no_grad():
        logits = export.load_packed(tmp_path / "f16.ftc")(test_inputs)
    scale = max(1.0, float(reference_logits.abs().max()))
    assert half["bytes"] < full["bytes"]
    assert (logits - reference_logits).abs().max() <= export.FLOAT16_RTOL * scale


def test_compaction_removes_dead_and_unused_channels_and_keeps_the_padded_constant(run_dir: Path) -> None:
    model, masks, spec = export.load_run(run_dir)
    small, small_masks = export.compact(model, spec, masks)
    shapes = {name: tuple(p.shape) for name, p in small.named_parameters() if name.endswith("weight")}
    assert shapes["features.0.weight"] == (6, 1, 3, 3)  # channels 1 and 5 gone, constant channel 2 kept
    assert shapes["features.3.weight"] == (16, 6, 3, 3)
    assert shapes["features.7.weight"] == (15, 16, 3, 3)
    assert shapes["classifier.0.weight"] == (30, 15)
    assert shapes["classifier.3.weight"] == (10, 30)
    assert small.features[8].running_mean.shape == (15,)
    assert {n: tuple(m.shape) for n, m in small_masks.items()} == {n: shapes[n] for n in masks}


def test_compacted_packed_file_rebuilds_the_smaller_model(run_dir: Path, tmp_path: Path) -> None:
    export.export(run_dir, "packed", tmp_path / "c.ftc", compact_model=True)
    model = export.load_packed(tmp_path / "c.ftc")
    assert export.channel_count(model) == 8 + 16 + 16 + 32 + 10 - 5


def test_compaction_of_an_unsupported_architecture_is_one_clear_error() -> None:
    model = build_model("resnet18", CLASSES, SHAPE, 0.125)
    with pytest.raises(ValueError, match="compaction supports the cnn and vgg11 models.*export without --compact"):
        export.compact_state(model, model.state_dict())


def test_vgg11_compaction_is_exact(test_inputs: torch.Tensor) -> None:
    model = build_model("vgg11", CLASSES, SHAPE, 0.125, seed=0).eval()
    spec = export.ModelSpec("vgg11", CLASSES, SHAPE, 0.125)
    masks = {n: torch.ones_like(model.get_parameter(n), dtype=torch.bool) for n in prunable_names(model)}
    masks["features.4.weight"][:3] = False  # three dead channels in the second conv
    masks["features.11.weight"][:, 2] = False  # one channel of the third conv unused by the fourth
    with torch.no_grad():
        for name, mask in masks.items():
            model.get_parameter(name).mul_(mask)
        model.features[5].bias[:3] = -1.0  # relu(BN) == 0 for the dead channels
        small, _ = export.compact(model, spec, masks)
        assert small.features[4].weight.shape[0] == 16 - 3
        assert tuple(small.features[8].weight.shape) == (32 - 1, 16 - 3, 3, 3)
        assert small.features[11].weight.shape[1] == 32 - 1
        assert (small(test_inputs) - model(test_inputs)).abs().max() <= 1e-4


def test_packed_meta_is_json_and_the_loader_does_not_import_flower(run_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "m.ftc"
    export.export(run_dir, "packed", path)
    meta = json.loads(bytes(codec.load(path)[0][export.META_KEY].tolist()))
    assert meta["model"] == NAME and meta["input_shape"] == list(SHAPE) and meta["num_classes"] == CLASSES
    code = (
        "import sys, torch; from shared.export import load_packed; "
        f"m = load_packed({str(path)!r}); m(torch.zeros(2, *{SHAPE!r})); "
        "assert not any(k.split('.')[0] == 'flwr' for k in sys.modules), 'flwr imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_onnx_graph_has_batch_norm_folded(run_dir: Path, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    export.export(run_dir, "onnx", tmp_path / "m.onnx")
    ops = {node.op_type for node in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert "Conv" in ops and "BatchNormalization" not in ops


def test_cli_export_then_infer_reports_accuracy_and_latency(run_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "m.onnx"
    assert main(["export", str(run_dir), "--format", "onnx", "--compact", "--out", str(out)]) == 0
    assert main(["infer", str(out), "--dataset", "digits", "--batch-size", "32", "--repeats", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "of the dense float32 state dict" in lines[0] and "channels removed: 5" in lines[0]
    assert "format=onnx" in lines[-1] and "accuracy=" in lines[-1] and "latency_ms_per_batch=" in lines[-1]


def test_cli_float16_for_a_non_packed_format_is_a_one_line_error(run_dir: Path, tmp_path: Path, capsys) -> None:
    code = main(["export", str(run_dir), "--format", "onnx", "--float16", "--out", str(tmp_path / "m.onnx")])
    assert code == 2
    assert capsys.readouterr().err.strip() == "fedtiny: --float16 applies to --format packed only"
