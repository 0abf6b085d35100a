"""llm_jax: JAX/Flax language-model pretraining."""
import pathlib

from setuptools import find_packages, setup

requirements = [
    line.split("#")[0].strip()
    for line in pathlib.Path(__file__).with_name("requirements.txt").read_text().splitlines()
    if line.split("#")[0].strip() and not line.startswith("pytest")
]

setup(
    name="llm_jax",
    version="0.1.0",
    description="JAX/Flax research codebase for pretraining language models",
    packages=find_packages(include=["llm_jax", "llm_jax.*"]),
    python_requires=">=3.11",
    install_requires=requirements,
    extras_require={"test": ["pytest>=8.0", "pytest-xdist>=3.8"], "tpu": ["jax[tpu]"]},
)
