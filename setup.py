"""Installable library.

    pip install -e .              runtime dependencies only (requirements.txt)
    pip install -e ".[dev]"       + test and lint tools (requirements-dev.txt)
    pip install -e ".[mpi]"       + mpi4py and the PyPI MPI build (requirements-mpi.txt)

`make install` installs all three into .venv/ with torch pinned in the same pip call as deepspeed (see the Makefile).
"""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent


def read_requirements(name: str) -> list[str]:
    """Requirement lines of ``name`` without comments."""
    lines = (HERE / name).read_text(encoding="utf-8").splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


setup(
    name="dskd_scale",
    version="0.1.0",
    description="Dual-Space Knowledge Distillation of large language models on DeepSpeed ZeRO-3",
    packages=find_packages(include=["dskd_scale", "dskd_scale.*"]),
    python_requires=">=3.10",
    install_requires=read_requirements("requirements.txt"),
    extras_require={"dev": read_requirements("requirements-dev.txt"), "mpi": read_requirements("requirements-mpi.txt")},
)
