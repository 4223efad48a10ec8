"""bipe_jax: Bilevel Positional Encoding (BiPE) language models in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="bipe_jax",
    version="0.1.0",
    description="Length-extrapolation research with Bilevel Positional Encoding in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # configs/ holds experiment files passed by path; only the package is installed.
    packages=find_packages(include=["bipe_jax", "bipe_jax.*"]),
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "grain>=0.2.18",
        "sentencepiece>=0.2.3",
        "ml-collections>=1.1.0",
        "absl-py>=2.5.1",
        "numpy>=2.0",
        "matplotlib>=3.9",
        "tensorboard>=2.21",   # event-file writer for scalar logs (no TensorFlow needed)
        "safetensors>=0.8.0",  # reading released checkpoints with numpy, no torch
        "array-record>=0.8.6",
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6.100", "pytest-xdist>=3.6"],
    },
    entry_points={
        "console_scripts": [
            "bipe-train=bipe_jax.train:run",
            "bipe-eval=bipe_jax.evaluate:run",
            "bipe-convert=bipe_jax.convert:run",
            "bipe-compare=bipe_jax.compare:run",
            "bipe-generate=bipe_jax.generate:run",
        ],
    },
)
