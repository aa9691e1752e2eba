"""Package discovery, the one thing pyproject.toml cannot say: every package under qguard_stream/
is found, and the top-level kernels/ folder is added as qguard_stream.kernels (its package-dir
mapping is in pyproject.toml). A missing subpackage can then never break the wheel again."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["qguard_stream", "qguard_stream.*"]),
                "qguard_stream.kernels"])
