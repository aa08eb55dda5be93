"""An installed wheel works outside the checkout: suites, guest recipes, the asv suite and
the analysis package ship inside it, with no symlink and no climbing out of the package."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
         "-w", str(out), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return next(out.glob("dynamem-*.whl"))


def test_the_wheel_holds_the_data_and_no_symlink(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in (
        "dynamem/analysis/report.py",
        "dynamem/suites/quick.toml",
        "dynamem/suites/study.toml",
        "dynamem/recipes/minimal/recipe.toml",
        "dynamem/recipes/minimal/sampler/dynamem-sampler.c",
        "dynamem/recipes/minimal/packages.lock.json",
        "dynamem/bench/resize.py",
    ):
        assert name in names, name


def test_an_installed_dynamem_runs_outside_the_checkout(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
         str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(target)}
    env.pop("DYNAMEM_REPO", None)
    env.pop("DYNAMEM_RESULTS", None)
    probe = subprocess.run(
        [sys.executable, "-c", "import dynamem, dynamem.paths as p; print(dynamem.__file__); "
         "print(p.checkout()); print(p.results_dir()); print(p.guests_dir())"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    module, checkout, results, guests = probe.stdout.split()
    assert module.startswith(str(target)) and checkout == "None"
    assert results == str(tmp_path / "results") and guests.startswith(str(target))
    res = subprocess.run(
        [sys.executable, "-m", "dynamem.cli", "run", "--suite", "study", "--dry-run"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "hyperalloc-balloon" in res.stdout
