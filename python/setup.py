"""Marks the wheel as platform-specific: it bundles libflashmla.so, but no CPython extension, so the tag is
py3-none-<platform> (e.g. py3-none-linux_x86_64) and the files install into platlib. Everything else is in
pyproject.toml."""

import os
import sysconfig

from setuptools import setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.dist import Distribution


class BinaryDistribution(Distribution):
    """A distribution that carries a native library (so setuptools never treats it as pure Python)."""

    def has_ext_modules(self):
        return True


class PlatformWheel(bdist_wheel):
    def finalize_options(self):
        super().finalize_options()
        self.root_is_pure = False

    def get_tag(self):
        plat = self.plat_name or sysconfig.get_platform()
        return "py3", "none", plat.replace("-", "_").replace(".", "_")


if not os.path.exists(os.path.join(os.path.dirname(os.path.abspath(__file__)), "flashmla", "libflashmla.so")):
    raise SystemExit("flashmla/libflashmla.so is missing: build the wheel with scripts/build-wheel.sh")

setup(distclass=BinaryDistribution, cmdclass={"bdist_wheel": PlatformWheel})
