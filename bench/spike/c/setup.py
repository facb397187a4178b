"""Build: ``python setup.py build_ext --inplace`` (needs a C compiler and zlib's headers)."""

from setuptools import Extension, setup

setup(
    name="spike-c",
    ext_modules=[Extension("spike_c", ["spike_c.c"], libraries=["z"], extra_compile_args=["-O2"])],
)
