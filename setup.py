# The cffi extension is the one thing pyproject.toml cannot declare.
from setuptools import setup

setup(cffi_modules=["native/build_native.py:ffibuilder"])
