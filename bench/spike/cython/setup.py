"""Build: ``python setup.py build_ext --inplace`` (needs Cython and zlib's headers)."""

from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    name="spike-cython",
    ext_modules=cythonize(
        [Extension("spike_cy", ["spike_cy.pyx"], libraries=["z"], extra_compile_args=["-O2"])]
    ),
)
