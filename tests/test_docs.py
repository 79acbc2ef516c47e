"""The docs speak to users about what the software does now, and their commands work as written.

- No lab notebook: README.md and every text file under docs/ (and the configs) are scanned for the
  phrases in NOTEBOOK; no `.patch` file lives anywhere in the tree.
- Every fenced `fedtiny ...` command in README.md and docs/ parses, and its --config and key=value
  overrides load and validate (nothing is run). Synopsis lines (`[--flag]`, `<NAME>`, `...`) are
  usage patterns, not commands, and are left out.
- The C build command in the docs compiles and runs where `cc` exists.
- docs/configuration.md is exactly what `fedtiny config --reference` prints.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shared.config import load_config
from simulations.cli.main import main, parse
from simulations.cli.reference import reference

ROOT = Path(__file__).resolve().parent.parent
SKIP_DIRS = {".git", ".venv", "outputs", "node_modules", "__pycache__", ".pytest_cache"}

# Phrases of a lab notebook: how a figure was reached belongs in git history, not in the docs.
NOTEBOOK = {
    "the word 'session'": r"\bsessions?\b",
    "'the issue'": r"\bthe issue\b",
    "a git worktree recipe": r"\bgit worktree add\b",
    "a checkout of an old commit": r"\bgit (?:-C \S+ )?checkout [0-9a-f]{7,40}\b",
    "a patch file": r"[\w/-]\.patch\b",
}


def doc_files() -> list[Path]:
    """README.md and every text file under docs/ (whoever wrote it)."""
    files = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").rglob("*") if p.is_file())]
    return [p for p in files if _text(p) is not None]


def _text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None  # a figure or other binary file


def _tree() -> list[Path]:
    found = []
    for path in ROOT.iterdir():
        if path.name in SKIP_DIRS:
            continue
        found += [path] if path.is_file() else [p for p in path.rglob("*") if not SKIP_DIRS & set(p.parts)]
    return found


@pytest.mark.parametrize("path", [*doc_files(), *sorted((ROOT / "configs").glob("*.yaml"))], ids=lambda p: str(p.relative_to(ROOT)))
def test_no_lab_notebook_phrases(path: Path) -> None:
    text = _text(path) or ""
    hits = [f"line {text.count(chr(10), 0, m.start()) + 1}: {what} ({m.group(0)!r})"
            for what, pattern in NOTEBOOK.items() for m in re.finditer(pattern, text, re.IGNORECASE)]
    assert not hits, f"{path.relative_to(ROOT)} reads like a lab notebook: " + "; ".join(hits)


def test_the_notebook_phrases_catch_what_they_should_and_nothing_else() -> None:
    caught = ["in the ninth session", "Sessions 3-5", "the issue's targets", "git worktree add ../gridrun 670710a",
              "git checkout 670710a", "git -C ../g checkout fb739fd", "apply regime-v4.patch"]
    for text in caught:
        assert any(re.search(p, text, re.IGNORECASE) for p in NOTEBOOK.values()), text
    fine = ["an onnxruntime InferenceSession", "ray's session_latest folder", "git checkout main", "this issue of",
            "a dispatched job", "the issues tracker"]
    for text in fine:
        assert not any(re.search(p, text, re.IGNORECASE) for p in NOTEBOOK.values()), text


def test_no_patch_files_in_the_tree() -> None:
    patches = [str(p.relative_to(ROOT)) for p in _tree() if p.suffix == ".patch"]
    assert not patches, f"patch files belong in git history, not the tree: {patches}"


def fenced_commands(text: str, program: str) -> list[str]:
    """The lines of fenced code blocks that run `program` (continuations joined, comments and prompts dropped)."""
    commands = []
    for block in re.findall(r"^ *```[\w-]*\n(.*?)^ *```", text, re.MULTILINE | re.DOTALL):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.sub(r"\s+#.*$", "", line.strip().removeprefix("$ "))
            words = line.split()
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value before the command
                words.pop(0)
            if words and words[0] == program:
                commands.append(line)
    return commands


def _write_guide_packages(text: str, folder: Path, monkeypatch) -> None:
    """The guide's own packages: each python block opening with `# pkg/module.py` becomes that file,
    importable for this test only (as from the folder a user runs `fedtiny` in)."""
    for path, code in re.findall(r"```python\n# (\w+/\w+\.py)[^\n]*\n(.*?)```", text, re.DOTALL):
        (folder / path).parent.mkdir(exist_ok=True)
        (folder / path).write_text(code)
        for name in [m for m in sys.modules if m.split(".")[0] == path.split("/")[0]]:
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(folder))


def _synopsis(command: str) -> bool:
    return bool(re.search(r"\s\[|<[A-Za-z_]+>|\.\.\.", command))


DOC_COMMANDS = [(path, c) for path in doc_files() for c in fenced_commands(_text(path), "fedtiny") if not _synopsis(c)]


def test_the_docs_have_commands_to_check() -> None:
    assert len(DOC_COMMANDS) >= 20 and any("README" in str(p) for p, _ in DOC_COMMANDS)


@pytest.mark.parametrize("path, command", DOC_COMMANDS, ids=[f"{p.name}:{c[:60]}" for p, c in DOC_COMMANDS])
def test_every_documented_fedtiny_command_parses_and_its_config_validates(path, command, monkeypatch, capsys,
                                                                         tmp_path) -> None:
    monkeypatch.chdir(ROOT)
    _write_guide_packages(_text(path), tmp_path, monkeypatch)
    words = shlex.split(command)
    for assignment in words[: words.index("fedtiny")]:
        name, _, value = assignment.partition("=")
        if name == "PYTHONPATH":  # e.g. the worked example method in tests/
            monkeypatch.syspath_prepend(str(ROOT / value))
    argv = words[words.index("fedtiny") + 1:]
    try:
        args = parse(argv)
    except SystemExit as exc:
        pytest.fail(f"{path.name}: `{command}` does not parse (exit {exc.code}): {capsys.readouterr().err.strip()}")
    if getattr(args, "resume", None) or getattr(args, "reference", False) or not hasattr(args, "overrides"):
        return
    config = load_config(args.config, args.overrides)
    if args.command == "compare":
        from simulations.cli import compare, suite

        if args.suite:
            for cell in suite.load(args.suite).cells():
                compare.method_overrides(cell.method, f"suite {args.suite}")
        else:
            densities = args.densities or compare.DEFAULT_DENSITIES
            compare.grid(args.methods.split(","), [float(d) for d in densities.split(",")], [0])
    elif args.command == "deploy-local":
        assert args.nodes >= 1
    assert config.method


C_BUILD = [c for path in doc_files() for c in fenced_commands(_text(path), "cc") if "fedtiny_main.c" in c]


def test_the_docs_show_the_c_build_command() -> None:
    assert C_BUILD


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc) on PATH")
@pytest.mark.parametrize("command", C_BUILD)
def test_the_documented_c_build_command_compiles_and_runs(command: str, tmp_path: Path) -> None:
    """An exported header in m/ beside the project's C runtime, built with the command as written."""
    import torch

    from shared import export
    from shared.models import build_model

    model = build_model("cnn", 10, (1, 8, 8), 0.5, seed=0).eval()
    meta = {"format": "fedtiny-export", "version": 1, "model": "cnn", "num_classes": 10, "input_shape": [1, 8, 8],
            "density": 1.0, "normalization": {"divide_by": 1.0, "mean": [0.0], "std": [1.0]}}
    (tmp_path / "m").mkdir()
    export.save_c(tmp_path / "m" / "model.h", model, meta)
    (tmp_path / "shared").symlink_to(ROOT / "shared")
    build = command.split("&&")[0].strip()
    done = subprocess.run(build, shell=True, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, f"`{build}` failed: {done.stderr.strip()}"
    x = torch.zeros(2, 1, 8, 8).numpy().astype("float32").tobytes()
    ran = subprocess.run([str(tmp_path / "infer")], input=x, cwd=tmp_path, capture_output=True)
    assert ran.returncode == 0 and len(ran.stdout.decode().splitlines()) == 2


def test_the_configuration_reference_is_generated_from_the_dataclasses() -> None:
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == reference(), "docs/configuration.md is stale: run `fedtiny config --reference > docs/configuration.md`"


def test_the_reference_names_every_key_of_the_default_config() -> None:
    from shared.config import to_flat

    text = reference()
    missing = [k for k in to_flat(load_config()) if k != "user_sections" and f"`{k}`" not in text]
    assert not missing


def test_the_readme_is_short_enough_to_read() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300

