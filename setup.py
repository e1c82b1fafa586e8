"""What pyproject.toml cannot declare: the cffi extension (native/build_native.py).

The gRPC stubs come from the fse-client package (clients/python), generated once
from proto/ for the client and the daemon alike.
"""

from setuptools import setup

setup(cffi_modules=["native/build_native.py:ffibuilder"])
