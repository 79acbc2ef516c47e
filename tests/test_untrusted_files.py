"""No file or folder from outside runs code: a run folder's config names no trust, a header is read,
not compiled blindly, a packed model decodes only to its architecture's layout."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from simulations.cli import main as cli_main
from simulations.cli.run import resume_config

EVIL = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\ndef load(*a, **k): pass\nclass M: pass\n"


@pytest.fixture
def sent_folder(tmp_path, monkeypatch):
    """A run folder someone sent, whose config trusts their package `evilpkg` (importing it writes a
    marker), and that package in the current directory, where `trusted` packages are looked up."""
    marker = tmp_path / "ran"
    (tmp_path / "evilpkg").mkdir()
    (tmp_path / "evilpkg" / "__init__.py").write_text(EVIL.format(marker=str(marker)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "evilpkg", raising=False)
    folder = tmp_path / "sent-run"
    folder.mkdir()
    (folder / "checkpoint.json").write_text("{}")

    def write(**config):
        (folder / "config.yaml").write_text(yaml.safe_dump({"trusted": ["evilpkg"], **config}))
        return folder

    return write, marker


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedtiny: ") and "\n" not in err
    return err


@pytest.mark.parametrize("config", [{"dataset": {"name": "evilpkg:load"}}, {"method": "evilpkg:M"}],
                         ids=["dataset", "method"])
def test_resume_never_takes_trust_from_the_run_folder(sent_folder, capsys, config):
    write, marker = sent_folder
    folder = write(**config)
    assert cli_main(["run", "--resume", str(folder), "--no-progress"]) == 2
    assert not marker.exists()
    assert "'evilpkg', which is not trusted" in _one_line(capsys)


def test_infer_never_takes_trust_from_the_run_folder(sent_folder, capsys):
    write, marker = sent_folder
    folder = write(dataset={"name": "evilpkg:load"})
    assert cli_main(["infer", str(folder)]) == 2
    assert not marker.exists()
    assert "'evilpkg', which is not trusted" in _one_line(capsys)


def test_export_of_an_older_run_folder_never_takes_its_trust(sent_folder, capsys):
    """A run folder without model-spec.json (older runs) is rebuilt from its config.yaml."""
    write, marker = sent_folder
    folder = write(method="evilpkg:M")
    (folder / "model.ftc").write_bytes(b"")
    assert cli_main(["export", str(folder), "--out", str(folder / "m.ftc")]) == 2
    assert not marker.exists()
    assert "'evilpkg', which is not trusted" in _one_line(capsys)


def test_resume_trusts_what_its_command_line_says(sent_folder):
    write, marker = sent_folder
    folder = write(method="fedavg")
    assert resume_config(folder, []).trusted == []
    assert resume_config(folder, ["trusted=mine,yours"]).trusted == ["mine", "yours"]
    assert not marker.exists()


def test_infer_trusts_its_trust_flags_only():
    from simulations.cli.export import data_settings
    from simulations.cli.main import parse

    args = parse(["infer", "model.ftc", "--trust", "mine", "--trust", "yours"])
    records = {"model.ftc": {"dataset": "digits", "trusted": ["evilpkg"]}}
    assert data_settings(args, records)["trusted"] == ["mine", "yours"]


# ----------------------------------------------------------------------------- packed model files


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A packed file of a small pruned cnn, as `fedtiny export` writes it."""
    import torch

    from shared import export
    from shared.pruning import compute_masks

    spec = export.ModelSpec("cnn", 10, (1, 8, 8), 0.5)
    model = spec.build()
    masks = compute_masks(model, 0.2, allocation="erk")
    path = tmp_path_factory.mktemp("packed") / "model.ftc"
    export.save_packed(path, model, spec, masks, metadata={"format": "fedtiny-export", "version": 1})
    return path, torch


def _with_meta(packed_path, out, **changes):
    """`packed_path` with its `__meta__` JSON changed."""
    import json

    import torch

    from shared import codec

    tensors, masks = codec.load(packed_path)
    meta = json.loads(bytes(tensors["__meta__"].tolist()))
    meta.update(changes)
    tensors["__meta__"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    codec.save(out, tensors, masks)
    return out


@pytest.mark.parametrize("changes, why", [
    ({"num_classes": 10**9}, r"num_classes 1000000000 is not in \[1, 100000\]"),
    ({"input_shape": [1, 10**6, 10**6]}, "input_shape"),
    ({"input_shape": [3, 4096, 4096], "width": 16.0, "model": "cnn-pool"}, "elements, over"),
    ({"width": 1e300}, "width"),
    ({"num_classes": "Infinity"}, "corrupt __meta__"),
    ({"folded": [1, 2]}, "folded is not a list"),
    ({"folded": ["no.such.layer"]}, "do not rebuild a cnn"),
])
def test_packed_meta_sizes_are_bounded_before_anything_is_built(packed, tmp_path, changes, why):
    from shared import export

    path = _with_meta(packed[0], tmp_path / "bad.ftc", **changes)
    with pytest.raises(ValueError, match=why) as err:
        export.load_packed(path)
    assert "\n" not in str(err.value)


def test_a_packed_entry_larger_than_its_architecture_is_refused_from_its_header(packed, tmp_path):
    """31 bytes of a delta-coded all-False mask could claim a tensor of 2**26 elements."""
    import torch

    from shared import codec, export

    tensors, masks = codec.load(packed[0])
    name = next(n for n in masks)
    big = (tensors[name].shape[0] * 1000, *tensors[name].shape[1:])
    tensors[name], masks[name] = torch.zeros(big), torch.zeros(big, dtype=torch.bool)
    codec.save(tmp_path / "big.ftc", tensors, masks)
    assert (tmp_path / "big.ftc").stat().st_size < 100_000
    with pytest.raises(codec.DecodeError, match=f"entry '{name}' claims shape .*, expected at most"):
        export.load_packed(tmp_path / "big.ftc")


FUZZ_VALUES = [0, -1, 2, 10**9, 3.5, "x", "vgg11", None, True, [], [1], [3, 8, 8], [1, 2, 3, 4], ["features.1"],
               ["classifier"], ["features.0", "features.0"], {"a": 1}]


def test_fuzzed_packed_files_load_or_give_one_value_error(packed, tmp_path):
    """Random bytes, cuts and `__meta__` values: each file loads or is one ValueError line, never
    another exception."""
    import random

    from shared import export

    data = packed[0].read_bytes()
    rng = random.Random(0)
    path = tmp_path / "fuzz.ftc"
    loaded = 0
    for _ in range(800):
        blob = bytearray(data)
        kind = rng.random()
        if kind < 0.3:
            for _ in range(rng.randint(1, 4)):
                blob[rng.randrange(len(blob))] = rng.randrange(256)
        elif kind < 0.5:
            blob = blob[: rng.randrange(len(blob))]
        elif kind < 0.6:
            at = rng.randrange(len(blob) - 8)
            blob[at : at + 8] = rng.randbytes(8)
        else:
            keys = rng.sample(["model", "width", "num_classes", "input_shape", "folded", "compact", "version"], 2)
            blob = bytearray(_with_meta(packed[0], tmp_path / "meta.ftc",
                                        **{k: rng.choice(FUZZ_VALUES) for k in keys}).read_bytes())
        path.write_bytes(bytes(blob))
        try:
            export.load_packed(path)
            loaded += 1
        except ValueError as exc:
            assert "\n" not in str(exc)
    assert loaded < 800


def test_infer_of_a_corrupt_packed_file_is_one_line_and_exit_2(packed, tmp_path, capsys):
    path = _with_meta(packed[0], tmp_path / "bad.ftc", num_classes=10**9)
    assert cli_main(["infer", str(path), "--dataset", "digits"]) == 2
    assert "num_classes 1000000000" in _one_line(capsys)


# ----------------------------------------------------------------------------- C headers

needs_cc = pytest.mark.skipif(__import__("shutil").which("cc") is None, reason="no C compiler")


@pytest.fixture(scope="module")
def header(tmp_path_factory):
    """A C header of a small pruned cnn on digits, as `fedtiny export --format c` writes it."""
    from shared import export
    from shared.pruning import compute_masks

    spec = export.ModelSpec("cnn", 10, (1, 8, 8), 0.5)
    model = spec.build()
    compute_masks(model, 0.2, allocation="erk")
    meta = {"format": "fedtiny-export", "version": 1, "model": "cnn", "num_classes": 10, "input_shape": [1, 8, 8],
            "density": 0.2, "dataset": "digits", "seed": 0, "test_fraction": 0.2,
            "normalization": {"divide_by": 16.0, "mean": [0.3], "std": [0.4]}}
    path = tmp_path_factory.mktemp("header") / "model.h"
    export.save_c(path, model, meta)
    return path


CONSTRUCTOR = '__attribute__((constructor)) static void sent(void) {{ fclose(fopen("{marker}", "w")); }}\n'


def _in_model_name(text, name):
    """The header the exporter would write for a model of this name (the first comment prints it as it is)."""
    import json

    escaped = json.dumps(name).replace("*/", "*\\/")
    return text.replace("model cnn,", f"model {name},", 1).replace('"model": "cnn"', f'"model": {escaped}', 1)


def _variant(header, tmp_path, edit):
    path = tmp_path / "sent.h"
    path.write_text(edit(header.read_text()))
    return path


@needs_cc
@pytest.mark.parametrize("edit", [
    lambda text, code: text.replace("#endif\n", code + "#endif\n"),
    lambda text, code: text.replace('#include "fedtiny_infer.h"\n', '#include "fedtiny_infer.h"\n#include <stdio.h>\n' + code),
    lambda text, code: _in_model_name(text, "cnn */ int system(const char *); " + code.strip().replace(
        'fclose(fopen("', 'system("touch ').replace('", "w"))', '")') + " /*"),
], ids=["appended", "after-include", "in-model-name"])
def test_infer_of_a_header_that_would_run_code_never_runs_it(header, tmp_path, capsys, edit):
    marker = tmp_path / "ran"
    path = _variant(header, tmp_path, lambda text: edit(text, CONSTRUCTOR.format(marker=marker)))
    assert cli_main(["infer", str(path)]) == 2
    assert not marker.exists()
    assert "not a header written by `fedtiny export --format c`" in _one_line(capsys)


@pytest.mark.parametrize("edit, why", [
    (lambda t: t.replace("static const uint16_t ft_l0_col[", "static const uint16_t ft_l0_col_[", 1), "does not hold"),
    (lambda t: t.replace("{FT_CONV2D, 1, 8, 8,", "{FT_CONV2D, 9, 8, 8,", 1), "do not follow"),
    (lambda t: t.replace("{FT_LINEAR,", "{FT_RELU,", 1), r"output \(64, 1, 1\) for input"),
    (lambda t: t.replace("#define FEDTINY_DATA_BYTES ", "#define FEDTINY_DATA_BYTES 1", 1), "line 9 differs"),
    (lambda t: t.replace('"num_classes": 10', '"num_classes": "10, 0); system(0"'), "metadata lacks"),
])
def test_a_header_whose_arrays_or_table_disagree_is_refused_before_compiling(header, tmp_path, edit, why):
    from shared.export.c_reader import HeaderError, check_header

    assert check_header(header) == header.read_text()
    with pytest.raises(HeaderError, match=why) as err:
        check_header(_variant(header, tmp_path, edit))
    assert "\n" not in str(err.value)


def test_a_column_index_past_its_layer_is_refused_even_in_the_exporters_format(header, tmp_path):
    """A header regenerated exactly from arrays whose last column index points past the layer's inputs."""
    import re

    from shared.export.c_reader import HeaderError, check_header

    def edit(text):
        body = re.search(r"static const uint16_t ft_l0_col\[\d+\] = \{\n    (.*?)\n\};", text, re.S)
        items = body.group(1).split(", ")
        return text.replace(body.group(0), body.group(0).replace(body.group(1), ", ".join([*items[:-1], "9"])))

    with pytest.raises(HeaderError, match="column 9 of 9"):
        check_header(_variant(header, tmp_path, edit))
