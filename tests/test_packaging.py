"""Packaging: ``pip install dskd_scale`` brings the runtime dependencies only, and each one is used.

setup.py is executed with ``setuptools.setup`` captured, so the test reads exactly what pip would install.
A runtime requirement must be imported by the library, a launcher, a tool or a benchmark, or say in
requirements.txt why not (``# not imported: <reason>``); every third-party import must be declared.
"""

from __future__ import annotations

import ast
import re
import runpy
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("dskd_scale", "launch", "tools", "benchmarks")
DEV_TOOLS = {"pytest", "pytest-timeout", "ruff"}
MPI_BUILD = {"mpi4py", "mpich"}
NOT_IMPORTED = re.compile(r"#\s*not imported:\s*\S")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(spec: str) -> str:
    return normalize(re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0])


@pytest.fixture(scope="module")
def setup_kwargs() -> dict:
    import setuptools

    captured: dict = {}
    original = setuptools.setup
    setuptools.setup = lambda **kwargs: captured.update(kwargs)
    try:
        runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    finally:
        setuptools.setup = original
    return captured


def imported_distributions() -> dict[str, set[str]]:
    """Distribution name -> files of CODE_DIRS that import one of its top-level modules (absolute imports)."""
    modules_to_dists = packages_distributions()
    used: dict[str, set[str]] = {}
    for folder in CODE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    tops = [alias.name.split(".")[0] for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    tops = [node.module.split(".")[0]]
                else:
                    continue
                for top in tops:
                    if top in sys.stdlib_module_names or top == "dskd_scale" or (path.parent / f"{top}.py").exists():
                        continue
                    for dist in modules_to_dists.get(top, [f"<no installed distribution for module {top!r}>"]):
                        used.setdefault(normalize(dist), set()).add(str(path.relative_to(ROOT)))
    return used


def test_install_requires_is_runtime_only_and_tools_are_extras(setup_kwargs) -> None:
    runtime = {requirement_name(spec) for spec in setup_kwargs["install_requires"]}
    assert runtime, "setup.py declares no install_requires"
    leaked = runtime & (DEV_TOOLS | MPI_BUILD)
    assert not leaked, f"dev/MPI tools in install_requires: {leaked}"
    extras = {name: {requirement_name(spec) for spec in specs}
              for name, specs in setup_kwargs["extras_require"].items()}
    assert extras["dev"] == DEV_TOOLS
    assert extras["mpi"] == MPI_BUILD
    # The pins that keep a CPU install off the CUDA build come together in the runtime requirements.
    pins = {requirement_name(spec): spec for spec in setup_kwargs["install_requires"]}
    assert "==" in pins["torch"] and "==" in pins["deepspeed"]


def test_every_runtime_requirement_is_imported_or_says_why_not(setup_kwargs) -> None:
    used = imported_distributions()
    lines = [line for line in (ROOT / "requirements.txt").read_text().splitlines() if line.split("#")[0].strip()]
    problems = []
    for line in lines:
        name = requirement_name(line.split("#")[0].strip())
        documented = bool(NOT_IMPORTED.search(line))
        if name not in used and not documented:
            problems.append(f"{name}: never imported in {CODE_DIRS} and no '# not imported: <reason>' comment")
        if name in used and documented:
            problems.append(f"{name}: marked 'not imported' but imported by {sorted(used[name])[:3]}")
    assert not problems, "\n".join(problems)


def test_every_third_party_import_is_declared(setup_kwargs) -> None:
    declared = {requirement_name(spec) for spec in setup_kwargs["install_requires"]}
    for specs in setup_kwargs["extras_require"].values():
        declared |= {requirement_name(spec) for spec in specs}
    undeclared = {dist: sorted(files)[:3] for dist, files in imported_distributions().items() if dist not in declared}
    assert not undeclared, f"imported but not in requirements*.txt: {undeclared}"


def test_make_install_puts_every_requirements_file_in_one_pip_call() -> None:
    """torch and deepspeed must be resolved together (else pip pulls a CUDA torch); the extras come along."""
    dry = subprocess.run(["make", "-n", "-B", "install"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    pip_calls = [line for line in dry.stdout.splitlines() if " pip install" in line and " -r " in line]
    assert len(pip_calls) == 1, dry.stdout
    for name in ("requirements.txt", "requirements-dev.txt", "requirements-mpi.txt"):
        assert f"-r {name}" in pip_calls[0], (name, pip_calls[0])
    assert any("--no-deps" in line and "-e ." in line for line in dry.stdout.splitlines()), dry.stdout
