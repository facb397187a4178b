"""Build: ``python setup.py build_ext --inplace`` (needs mypy, which ships mypyc)."""

from mypyc.build import mypycify
from setuptools import setup

setup(name="spike-mypyc", ext_modules=mypycify(["--no-namespace-packages", "spike_mypyc.py"]))
