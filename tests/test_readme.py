"""The README's commands are the ones CI and users run."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands():
    return [line.strip()[2:] for line in (ROOT / "README.md").read_text().splitlines() if line.strip().startswith("$ ")]


def test_ci_runs_exactly_the_readme_test_command():
    test_cmd = [c for c in _readme_commands() if "pytest" in c]
    assert len(test_cmd) == 1
    ci = [line for line in _without_if_blocks((ROOT / ".ci" / "run").read_text().splitlines())
          if line and not line.startswith(("#", "set ", "cd "))]
    assert ci == test_cmd


def _without_if_blocks(lines):
    """.ci/run's setup steps (`if ...; then ... fi` at the top level, e.g. installing sshd) are not the test command."""
    out, depth = [], 0
    for line in lines:
        if line.strip().startswith("if "):
            depth += 1
        if depth == 0:
            out.append(line)
        if line.strip() == "fi" and depth:
            depth -= 1
    return out


def test_readme_demo_command_runs_the_demo():
    demo = [c for c in _readme_commands() if c.endswith("vramtop demo")]
    assert len(demo) == 1


def test_screenshot_exists_and_was_saved_by_the_app():
    svg = (ROOT / "screenshots" / "dashboard.svg").read_text()
    assert svg.lstrip().startswith("<svg")
    assert "terminal" in svg and "parameters" in svg and "activations" in svg


def test_demo_extra_is_what_the_demo_needs_and_the_readme_installs_it():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {d.split("=")[0].split(">")[0] for d in extras["demo"]}
    assert names == {"torch", "transformers", "peft"}
    assert set(extras["demo"]) <= set(extras["test"])  # the same pins: never an unpinned (CUDA) torch
    assert "torch==2.13.0" in extras["demo"]
    demo = [c for c in _readme_commands() if c.endswith("vramtop demo")]
    assert "'.[demo]'" in demo[0]
