"""shared/registry.py: names to callables, and `package.module:name` imports from trusted packages only."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from shared.registry import USER_DIR_ENV, Registry, import_callable


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """A user's directory holding the package `ftuserpkg`, not on sys.path; sys.path restored afterwards."""
    pkg = tmp_path / "ftuserpkg"
    pkg.mkdir()
    (pkg / "models.py").write_text(textwrap.dedent("""
        def build(num_classes):
            return f"model with {num_classes} classes"
    """))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delenv(USER_DIR_ENV, raising=False)
    for name in [m for m in sys.modules if m.startswith("ftuserpkg")]:
        monkeypatch.delitem(sys.modules, name)
    return tmp_path


def test_a_trusted_package_in_the_current_directory_imports_without_pythonpath(user_dir, monkeypatch):
    monkeypatch.chdir(user_dir)
    assert str(user_dir) not in sys.path
    assert import_callable("ftuserpkg.models:build", "model", ["ftuserpkg"])(3) == "model with 3 classes"
    assert sys.path[-1] == str(user_dir)  # appended: an installed package of the same name would win


def test_flowers_processes_find_it_through_the_launchers_directory(user_dir, monkeypatch, tmp_path_factory):
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))  # a Ray worker runs somewhere else
    monkeypatch.setenv(USER_DIR_ENV, str(user_dir))
    assert import_callable("ftuserpkg.models:build", "model", ["ftuserpkg"])(2) == "model with 2 classes"


def test_an_untrusted_package_in_the_current_directory_is_refused_and_not_put_on_the_path(user_dir, monkeypatch):
    monkeypatch.chdir(user_dir)
    with pytest.raises(ValueError, match=r"not trusted; if you trust it, add it to the config: trusted=\[ftuserpkg\]"):
        import_callable("ftuserpkg.models:build", "model", [])
    assert str(user_dir) not in sys.path and "ftuserpkg" not in sys.modules


def test_a_directory_never_shadows_an_installed_package(user_dir, monkeypatch):
    (user_dir / "json").mkdir()
    (user_dir / "json" / "__init__.py").write_text("raise SystemExit('the user directory shadowed json')\n")
    monkeypatch.chdir(user_dir)
    assert import_callable("json:dumps", "callable", ["json"]) is json.dumps
    assert str(user_dir) not in sys.path


def test_an_unknown_name_lists_the_known_ones():
    reg = Registry("thing")
    reg.register("b")(len)
    reg.register("a")(len)
    with pytest.raises(ValueError, match="Unknown thing 'c'; known: a, b"):
        reg.get("c")
