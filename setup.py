"""Only a build hook (agent/pth_build_hook.py); the project is configured in pyproject.toml."""

import os
import sys

from setuptools import setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "agent"))
from pth_build_hook import build_py_with_pth  # noqa: E402

setup(cmdclass={"build_py": build_py_with_pth})
