"""One source of truth for versions: requirements.txt; pyproject and environment.yml agree with it."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def requirement_lines():
    return [line.split("#", 1)[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines() if line.split("#", 1)[0].strip()]


def pins(lines):
    return dict(line.split("==", 1) for line in lines)


def test_every_requirement_is_pinned_exactly():
    lines = requirement_lines()
    assert lines, "requirements.txt lists no packages"
    for line in lines:
        assert re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9][A-Za-z0-9.+\-]*", line), f"not an exact pin: {line!r}"
    assert pins(lines)["torch"] == "2.13.0"
    required = {"torch", "numpy", "matplotlib", "pillow", "safetensors", "tqdm", "ipywidgets", "jupyterlab",
                "ipykernel", "transformers", "diffusers", "tokenizers", "ftfy", "scikit-image", "pytest", "pytest-xdist", "nbval"}
    assert required <= set(pins(lines))


def test_environment_yml_parses_and_agrees_with_the_pins():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["name"] == "sdlearn"
    deps = env["dependencies"]
    python = next(d for d in deps if isinstance(d, str) and d.startswith("python"))
    major, minor = (int(v) for v in python.split("=")[-1].split(".")[:2])
    assert (major, minor) >= (3, 11)
    pip_section = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    assert pins(pip_section) == pins(requirement_lines())


def test_pyproject_reads_dependencies_from_requirements():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "dependencies" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["dependencies"]["file"] == ["requirements.txt"]
    assert project["project"]["requires-python"] == ">=3.11"


def test_ci_runs_the_readme_test_command():
    ci = [line for line in (ROOT / ".ci/run").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert ci[-1].strip() == "make test"
    assert "make test" in (ROOT / "README.md").read_text()
