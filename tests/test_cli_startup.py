"""The command line answers at once and says where a run is: help without heavy imports, the
static command and method tables against the code, folder names, a finished run's --resume, and
an interrupted compare."""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path

from shared import rundir
from shared.config import load_config
from shared.methods import METHODS as REGISTRY
from simulations.cli import compare
from simulations.cli.commands import COMMANDS, METHODS
from simulations.cli.main import main, parse

ROOT = Path(__file__).resolve().parent.parent


def test_help_and_version_import_neither_torch_nor_flower() -> None:
    code = ("import sys; from simulations.cli.main import parse\n"
            "for argv in (['--help'], ['--version'], ['run', '--help'], ['compare', '--help']):\n"
            "    try: parse(argv)\n"
            "    except SystemExit: pass\n"
            "print('heavy:' + ','.join(m for m in ('torch', 'flwr', 'scipy', 'ray') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "heavy:", done.stdout + done.stderr


def test_the_static_method_list_is_the_registry() -> None:
    assert set(METHODS) == set(REGISTRY.names())


def test_each_command_is_defined_by_the_module_the_table_names() -> None:
    for module in {m for m, _ in COMMANDS.values()}:
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(module).add_commands(sub)
        assert set(sub.choices) == {name for name, (m, _) in COMMANDS.items() if m == module}


def test_run_help_lists_the_methods_the_main_keys_and_fedtiny_config(capsys) -> None:
    try:
        parse(["run", "--help"])
    except SystemExit:
        pass
    out = capsys.readouterr().out
    assert all(m in out for m in METHODS)
    assert "pruning.density" in out and "fl.rounds" in out and "fedtiny config" in out


def test_folder_names_hold_no_colon() -> None:
    assert ":" not in rundir.default_output_dir("example_method:RandomRegrowth").name
    assert rundir.safe_name("mypkg.methods:Mine") == "mypkg.methods-Mine"
    assert ":" not in compare.Cell("mypkg.m:Mine", 0.05, 0).name


def test_resume_of_a_finished_run_says_so_and_changes_nothing(tmp_path, capsys) -> None:
    metrics = {"rounds": [], "summary": {"accuracy": 0.975, "bytes_up": 1, "bytes_down": 2}}
    (tmp_path / rundir.METRICS).write_text(json.dumps(metrics))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert main(["run", "--resume", str(tmp_path)]) == 0
    assert "has finished (accuracy=0.9750); nothing to resume" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_run_says_what_it_does_before_the_checks(capsys, monkeypatch, tmp_path) -> None:
    from simulations.cli import launch

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(launch, "simulate", stop)
    main(["run", "--config", str(ROOT / "configs" / "tiny.yaml"), f"output_dir={tmp_path}"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "fedtiny: checking the config, the data and the model"
    assert out[1].startswith(f"fedtiny: starting fedtiny in {tmp_path}")


def test_an_interrupted_compare_is_one_line_naming_the_command_that_continues_it(capsys, monkeypatch, tmp_path) -> None:
    from simulations.cli import launch

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(launch, "simulate", stop)
    argv = ["compare", "--config", str(ROOT / "configs" / "tiny.yaml"), "--methods", "fedtiny", "--densities", "0.05",
            f"output_dir={tmp_path}"]
    assert main(argv) == 130
    err = capsys.readouterr().err.strip()
    assert err == ("fedtiny: interrupted; continue the grid (finished cells are skipped) with: fedtiny compare --config "
                   f"{ROOT / 'configs' / 'tiny.yaml'} --methods fedtiny --densities 0.05 output_dir={tmp_path}")
