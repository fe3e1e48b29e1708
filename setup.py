"""Installable library: `pip install -e .` (see the Makefile and README for the pinned CPU install)."""

from pathlib import Path

from setuptools import find_packages, setup

requirements = [
    line.split("#")[0].strip()
    for line in Path(__file__).with_name("requirements.txt").read_text().splitlines()
    if line.split("#")[0].strip()
]

setup(
    name="dskd_scale",
    version="0.1.0",
    description="Dual-Space Knowledge Distillation of large language models on DeepSpeed ZeRO-3",
    packages=find_packages(include=["dskd_scale", "dskd_scale.*"]),
    python_requires=">=3.10",
    install_requires=requirements,
)
