"""Specification of edge export: every format and compaction give the run's logits; compaction removes channels;
every format records its metadata; packed and ONNX sizes follow density; the C header runs in C."""

from __future__ import annotations

import json
import shutil
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
SUFFIX = {"packed": ".ftc", "onnx": ".onnx", "torchscript": ".pt", "c": ".h"}
needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc) on PATH")


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


def test_a_runs_model_file_is_read_against_its_spec_so_a_bomb_is_refused_from_the_header(tmp_path: Path) -> None:
    export.write_spec(tmp_path, run_config(), load_dataset("digits", "", 0, 0.2))
    (tmp_path / rundir.MODEL).write_bytes(codec.encode({"w": torch.zeros(2**24)}))  # 64 MB of zeros, a few kB
    with pytest.raises(codec.DecodeError, match="over the limit"):
        export.load_run(tmp_path)


@pytest.mark.parametrize("compact", [False, True], ids=["full", "compact"])
@pytest.mark.parametrize("fmt", [pytest.param(f, marks=needs_cc) if f == "c" else f for f in export.FORMATS])
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


def test_export_makes_the_folder_it_writes_into(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "m" / "model.ftc"  # as in docs/export.md: `--out m/model.ftc` without an m/ yet
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    assert out.stat().st_size > 0


def test_cli_float16_for_a_non_packed_format_is_a_one_line_error(run_dir: Path, tmp_path: Path, capsys) -> None:
    code = main(["export", str(run_dir), "--format", "onnx", "--float16", "--out", str(tmp_path / "m.onnx")])
    assert code == 2
    assert capsys.readouterr().err.strip() == "fedtiny: --float16 applies to --format packed only"


# ----------------------------------------------------------------------------- BN folding, packed v1 and v2


def test_packed_file_has_batch_norm_folded_and_the_runs_masks(run_dir: Path, tmp_path: Path) -> None:
    export.export(run_dir, "packed", tmp_path / "m.ftc")
    tensors, masks = codec.load(tmp_path / "m.ftc")
    assert not [k for k in tensors if "running_" in k]
    assert {"features.0.bias", "classifier.0.bias"} <= set(tensors)  # the folded BN shift
    _, run_masks = codec.load(run_dir / "model.ftc")
    assert masks.keys() == run_masks.keys()
    assert all(torch.equal(masks[k], run_masks[k]) for k in masks)
    assert all(not bool(tensors[k][~masks[k]].any()) for k in masks)  # pruned weights stay zero


def test_packed_v1_file_without_folding_still_loads(tmp_path: Path, test_inputs: torch.Tensor,
                                                     reference_logits: torch.Tensor) -> None:
    state, masks = sparse_cnn()
    header = {"format": export.PACKED_FORMAT, "version": 1, "compact": False, "model": NAME,
              "num_classes": CLASSES, "input_shape": list(SHAPE), "width": WIDTH}
    state[export.META_KEY] = torch.tensor(list(json.dumps(header).encode()), dtype=torch.uint8)
    codec.save(tmp_path / "v1.ftc", state, masks)
    with torch.no_grad():
        assert (export.load_packed(tmp_path / "v1.ftc")(test_inputs) - reference_logits).abs().max() <= 1e-4
    assert export.read_metadata(tmp_path / "v1.ftc")["input_shape"] == list(SHAPE)


def masked_model(name: str, shape: tuple[int, int, int], density: float, seed: int = 0):
    """A model with random BN statistics and random masks keeping `density` of each prunable layer."""
    model = build_model(name, CLASSES, shape, 1.0, seed=seed).eval()
    g = torch.Generator().manual_seed(seed)
    masks = {}
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
        for n in prunable_names(model):
            p = model.get_parameter(n)
            keep = max(1, round(density * p.numel()))
            mask = torch.zeros(p.numel(), dtype=torch.bool)
            mask[torch.randperm(p.numel(), generator=g)[:keep]] = True
            masks[n] = mask.view_as(p)
            p.mul_(masks[n])
    return model, masks, export.ModelSpec(name, CLASSES, shape, 1.0)


@pytest.mark.parametrize("name", ["cnn", "cnn-pool"])
def test_packed_is_at_most_two_percent_of_dense_at_density_001_on_fashion_mnist_shapes(
    tmp_path: Path, name: str
) -> None:
    model, masks, spec = masked_model(name, (1, 28, 28), 0.01)
    size = export.save_packed(tmp_path / "m.ftc", model, spec, masks)
    assert size <= 0.02 * export.dense_state_bytes(model)
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (export.load_packed(tmp_path / "m.ftc")(x) - model(x)).abs().max() <= 1e-4


# ----------------------------------------------------------------------------- metadata and the --out suffix


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_every_format_records_data_preprocessing_shape_classes_and_density(
    run_dir: Path, tmp_path: Path, fmt: str
) -> None:
    out = tmp_path / f"m{SUFFIX[fmt]}"
    export.export(run_dir, fmt, out)
    meta = export.read_metadata(out)
    bundle = load_dataset("digits", "", 0, 0.2)
    _, masks = sparse_cnn()
    kept = sum(int(m.sum()) for m in masks.values())
    assert (meta["dataset"], meta["seed"], meta["test_fraction"]) == ("digits", 0, 0.2)
    assert meta["input_shape"] == list(SHAPE) and meta["num_classes"] == CLASSES and meta["model"] == NAME
    assert meta["normalization"]["mean"] == list(bundle.mean) and meta["normalization"]["std"] == list(bundle.std)
    assert meta["kept_weights"] == kept
    assert meta["density"] == pytest.approx(kept / sum(m.numel() for m in masks.values()))
    assert meta["export_format"] == fmt


@pytest.mark.parametrize("suffix, fmt", export.SUFFIXES.items())
def test_format_comes_from_the_out_suffix(run_dir: Path, tmp_path: Path, suffix: str, fmt: str) -> None:
    out = tmp_path / f"m{suffix}"
    assert export.export(run_dir, None, out)["format"] == fmt
    assert export.detect_format(out) == fmt


def test_cli_unknown_suffix_and_contradicting_format_are_one_line_errors(run_dir: Path, tmp_path: Path,
                                                                          capsys) -> None:
    assert main(["export", str(run_dir), "--out", str(tmp_path / "m.bin")]) == 2
    assert main(["export", str(run_dir), "--format", "onnx", "--out", str(tmp_path / "m.pt")]) == 2
    unknown, contradiction = capsys.readouterr().err.strip().splitlines()
    assert "unknown suffix '.bin'" in unknown and ".ftc (packed)" in unknown
    assert contradiction.endswith(f"--format onnx contradicts --out {tmp_path / 'm.pt'} (a .pt file is torchscript)")
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- ONNX size follows density


def test_sparse_onnx_gaps_bridge_distances_over_65535() -> None:
    from shared.export.onnx_sparse import MAX_GAP, gaps_of

    kept = np.array([3, 70_000, 200_000, 200_001])
    positions, gaps = gaps_of(kept)
    assert set(kept) <= set(positions.tolist())
    assert np.array_equal(np.cumsum(gaps.astype(np.int64)), positions)
    assert gaps.dtype == np.uint16 and int(gaps.max()) <= MAX_GAP


@pytest.mark.parametrize("density", [0.05, 0.01])
def test_onnx_size_follows_density_and_onnxruntime_gives_torchs_logits(tmp_path: Path, density: float) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    model, masks, spec = masked_model("cnn", (1, 28, 28), density)
    size = export.save_onnx(tmp_path / "m.onnx", model, spec.input_shape)
    onnx.checker.check_model(onnx.load(str(tmp_path / "m.onnx")))
    kept = sum(int(m.sum()) for m in masks.values())
    assert size <= 7 * kept + 12_000  # 4 bytes per value, 2 per gap; graph, biases and first layer fixed
    assert size <= (2 * density + 0.05) * export.dense_state_bytes(model)
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (export.load_predictor(tmp_path / "m.onnx")[1](x) - model(x)).abs().max() <= 1e-4


# ----------------------------------------------------------------------------- C header and runtime


@needs_cc
@pytest.mark.parametrize("name, shape", [("cnn", (1, 28, 28)), ("cnn-pool", (1, 28, 28)), ("vgg11", (3, 8, 8))])
def test_c_runtime_gives_torchs_logits(tmp_path: Path, name: str, shape: tuple[int, int, int]) -> None:
    model, masks, spec = masked_model(name, shape, 0.05)
    meta = {"format": "fedtiny-export", "version": 1, "model": name, "num_classes": CLASSES,
            "input_shape": list(shape), "density": 0.05,
            "normalization": {"divide_by": 1.0, "mean": [0.0] * shape[0], "std": [1.0] * shape[0]}}
    export.save_c(tmp_path / "model.h", model, meta)
    assert (tmp_path / "fedtiny_infer.c").is_file() and (tmp_path / "fedtiny_infer.h").is_file()
    binary = export.build_c(tmp_path / "model.h", tmp_path)
    x = torch.randn(8, *shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (export.run_c(binary, x) - model(x)).abs().max() <= 1e-4


@needs_cc
def test_c_runtime_preprocesses_raw_pixels_like_the_data_loader(run_dir: Path, tmp_path: Path,
                                                                reference_logits: torch.Tensor) -> None:
    export.export(run_dir, "c", tmp_path / "m.h")
    bundle = load_dataset("digits", "", 0, 0.2)
    pixels = torch.from_numpy(np.array(bundle.x_test, dtype=np.float32))
    logits = export.run_c(export.build_c(tmp_path / "m.h", tmp_path), pixels, pixels=True)
    assert (logits - reference_logits).abs().max() <= 1e-4


def test_c_header_stores_kept_weights_only(run_dir: Path, tmp_path: Path) -> None:
    from shared.export.c_export import program

    model, masks, _ = export.load_run(run_dir)
    ops = program(model)
    kept = sum(int(m.sum()) for m in masks.values())
    assert sum(len(op.arrays["val"]) for op in ops if op.arrays) == kept
    assert [op.kind for op in ops] == ["conv", "relu", "conv", "relu", "maxpool", "conv", "relu", "avgpool",
                                       "linear", "relu", "linear"]  # BN folded, flatten a no-op
    assert all(op.arrays["col"].dtype == np.uint16 and op.arrays["row_nnz"].dtype == np.uint16
               for op in ops if op.arrays)


def test_c_export_of_a_resnet_is_one_line_naming_the_layer(tmp_path: Path) -> None:
    model = build_model("resnet18", CLASSES, SHAPE, 0.125)
    with pytest.raises(ValueError, match=r"^C export cannot run layer layer1\.0 \(BasicBlock\)"):
        export.save_c(tmp_path / "m.h", model, {})
    assert not (tmp_path / "m.h").exists()


def test_c_export_of_an_unsupported_layer_names_it(tmp_path: Path) -> None:
    model = build_model(NAME, CLASSES, SHAPE, WIDTH)
    model.features[6] = torch.nn.AvgPool2d(2)
    with pytest.raises(ValueError, match=r"^C export cannot run layer features\.6 \(AvgPool2d\)"):
        export.save_c(tmp_path / "m.h", model, {})


# ----------------------------------------------------------------------------- infer reads what was recorded


@pytest.fixture(scope="module")
def seeded_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory on digits with seed 3 and test_fraction 0.3 (a test split of 540 images)."""
    out = tmp_path_factory.mktemp("seeded")
    config = run_config("seed=3", "dataset.test_fraction=0.3")
    (out / rundir.CONFIG).write_text(to_yaml(config))
    export.write_spec(out, config, load_dataset("digits", "", 3, 0.3))
    codec.save(out / rundir.MODEL, *sparse_cnn())
    return out


def test_cli_infer_of_a_run_directory_uses_its_recorded_split(seeded_run: Path, capsys) -> None:
    assert main(["infer", str(seeded_run), "--batch-size", "32", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("dataset=digits seed=3 test_fraction=0.3 test examples=540 ")
    assert "format=run" in lines[1]


def test_cli_infer_of_an_exported_file_uses_its_metadata_and_flags_override(seeded_run: Path, tmp_path: Path,
                                                                             capsys) -> None:
    export.export(seeded_run, None, tmp_path / "m.onnx")
    assert main(["infer", str(tmp_path / "m.onnx"), "--repeats", "1"]) == 0
    assert main(["infer", str(tmp_path / "m.onnx"), "--seed", "0", "--test-fraction", "0.2", "--repeats", "1"]) == 0
    firsts = [line for line in capsys.readouterr().out.splitlines() if line.startswith("dataset=")]
    assert firsts[0].startswith("dataset=digits seed=3 test_fraction=0.3 test examples=540 ")
    assert firsts[1].startswith("dataset=digits seed=0 test_fraction=0.2 test examples=360 ")


def test_cli_infer_refuses_a_dataset_the_model_does_not_record(seeded_run: Path, tmp_path: Path, capsys) -> None:
    export.export(seeded_run, None, tmp_path / "m.ftc")
    assert main(["infer", str(tmp_path / "m.ftc"), "--dataset", "fashion-mnist"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == (
        f"fedtiny: --dataset fashion-mnist contradicts {tmp_path / 'm.ftc'}, which records dataset digits"
    )
    assert captured.out == ""


def test_cli_infer_without_a_recorded_or_given_dataset_is_one_line(tmp_path: Path, capsys) -> None:
    model, masks, spec = masked_model(NAME, SHAPE, 0.5)
    export.save_packed(tmp_path / "bare.ftc", model, spec, masks)  # no metadata
    assert main(["infer", str(tmp_path / "bare.ftc")]) == 2
    assert capsys.readouterr().err.strip() == f"fedtiny: no dataset recorded in {tmp_path / 'bare.ftc'}; pass --dataset"


@pytest.mark.skipif(not Path(data.FASHION_MNIST_DIR).is_dir(), reason="Fashion-MNIST not installed")
def test_cli_infer_refuses_a_model_whose_input_shape_does_not_fit_the_data(tmp_path: Path, capsys) -> None:
    model, masks, spec = masked_model(NAME, SHAPE, 0.5)  # 8x8 inputs; Fashion-MNIST is 28x28
    export.save_packed(tmp_path / "bare.ftc", model, spec, masks)
    assert main(["infer", str(tmp_path / "bare.ftc"), "--dataset", "fashion-mnist"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"fedtiny: {tmp_path / 'bare.ftc'} takes inputs (1, 8, 8), but fashion-mnist images are (1, 28, 28)"
    )


def test_cli_infer_refuses_models_recording_different_splits(run_dir: Path, seeded_run: Path, tmp_path: Path,
                                                             capsys) -> None:
    export.export(run_dir, None, tmp_path / "a.ftc")
    export.export(seeded_run, None, tmp_path / "b.ftc")
    assert main(["infer", str(tmp_path / "a.ftc"), str(tmp_path / "b.ftc")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedtiny: the models record different seed values: 0 (") and err.endswith("pass --seed to choose")
    assert main(["infer", str(tmp_path / "a.ftc"), str(tmp_path / "b.ftc"), "--seed", "0", "--test-fraction", "0.2",
                 "--repeats", "1"]) == 0
