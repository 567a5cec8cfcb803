"""Only a build hook (pth_build_hook.py, shared with vramtop); configured in pyproject.toml."""

import os
import sys

from setuptools import setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pth_build_hook import build_py_with_pth  # noqa: E402

setup(cmdclass={"build_py": build_py_with_pth})
