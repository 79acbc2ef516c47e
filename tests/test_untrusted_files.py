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
