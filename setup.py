"""Packaging glue: the repository root is the `kvslim` package, so its subpackages and data folders
are found under it and named `kvslim.*` (setuptools' pyproject finder cannot add that prefix).
Everything else is in pyproject.toml."""

from setuptools import find_namespace_packages, setup
from setuptools.command.build_py import build_py

NOT_SHIPPED = ["tests", "tests.*", "benchmarks", "benchmarks.*", "build", "build.*", "dist", "dist.*",
               "out", "out.*", "*__pycache__*"]


class BuildPy(build_py):
    """This file sits in the package's folder but is not part of the package."""

    def find_package_modules(self, package, package_dir):
        return [m for m in super().find_package_modules(package, package_dir) if m[:2] != ("kvslim", "setup")]


setup(packages=["kvslim", *(f"kvslim.{name}" for name in find_namespace_packages(exclude=NOT_SHIPPED))],
      cmdclass={"build_py": BuildPy})
