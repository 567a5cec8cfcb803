"""The wheels ship what a non-editable install needs.

An editable install reads files from the source tree, so a data file missing from package-data only shows
in a wheel: the dashboard's stylesheet and the report's page template are loaded at run time, and both
packages carry a PEP 561 marker. Both wheels are built once, offline (no build isolation: the build backend
is the one installed here), from a fresh copy of the tree, so no stale build/ directory can supply a file.
"""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# What a build must not see or copy: local environments, caches and earlier build outputs.
NOT_COPIED = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache",
                                    ".hypothesis", "*.vramtop*")


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, set[str]]:
    """The file names in each wheel, by distribution name."""
    base = tmp_path_factory.mktemp("packaging")
    src, out = base / "src", base / "wheels"
    shutil.copytree(ROOT, src, ignore=NOT_COPIED)
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    for project in (src, src / "agent"):
        proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                               "-w", str(out), str(project)], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    names = {}
    for wheel in out.glob("*.whl"):
        with zipfile.ZipFile(wheel) as z:
            names[wheel.name.split("-")[0]] = set(z.namelist())
    assert set(names) == {"vramtop", "vramtop_agent"}, sorted(p.name for p in out.iterdir())
    return names


def test_the_viewer_wheel_ships_its_data_files_and_both_type_markers(wheels):
    files = wheels["vramtop"]
    assert "vramtop/tui/vramtop.tcss" in files  # VramtopApp.CSS_PATH
    assert "vramtop/report/report.html" in files  # the HTML report's page template
    assert "vramtop/py.typed" in files
    assert "vramtop_agent/py.typed" in files  # the viewer's wheel carries the agent package too


def test_the_agent_wheel_ships_its_type_marker_and_nothing_of_the_viewer(wheels):
    files = wheels["vramtop_agent"]
    assert "vramtop_agent/py.typed" in files
    assert not [f for f in files if f.startswith("vramtop/")]
