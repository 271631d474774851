"""The wheel: what ``pip install /path/to/keyjobs`` installs must hold every file of the package git tracks.

An editable install reads templates and static files from the checkout, so a
file missing from ``package-data`` shows up only once installed from a wheel:
the admin's overrides under ``templates/admin/keyjobs/`` went missing that way.
The wheel is built by pip from a copy of the tracked files, so that the build
leaves nothing in the checkout and sees nothing git does not track.
"""

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                                reason="needs git and a checkout: the tree is what git tracks")


def tracked(*paths: str) -> list[str]:
    listing = subprocess.run(["git", "ls-files", "-z", "--", *paths], cwd=ROOT, check=True, capture_output=True)
    return [name for name in listing.stdout.decode().split("\0") if name and (ROOT / name).exists()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """Build the wheel with pip, from a copy of what git tracks of the package and its metadata."""
    source = tmp_path_factory.mktemp("source")
    for name in tracked("keyjobs", "pyproject.toml", "README.md", "MANIFEST.in", "LICENSE"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    dist = tmp_path_factory.mktemp("dist")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(dist), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, f"pip wheel failed:\n{build.stdout}\n{build.stderr}"
    [built] = dist.glob("keyjobs-*.whl")
    return zipfile.ZipFile(built)


def test_the_wheel_holds_every_file_of_the_package_that_git_tracks(wheel: zipfile.ZipFile) -> None:
    in_wheel = set(wheel.namelist())

    missing = [name for name in tracked("keyjobs") if name not in in_wheel]

    assert not missing, f"tracked but not in the wheel: {missing}"


@pytest.mark.parametrize("name", [
    "keyjobs/templates/admin/keyjobs/app_index.html",
    "keyjobs/templates/admin/keyjobs/invocation/change_form.html",
    "keyjobs/templates/keyjobs/key.html",
    "keyjobs/static/keyjobs/timeline.js",
    "keyjobs/migrations/0001_initial.py",
])
def test_the_wheel_holds_the_admin_templates_static_files_and_migrations(wheel: zipfile.ZipFile, name: str) -> None:
    assert name in wheel.namelist()


def test_the_wheel_holds_nothing_but_the_package(wheel: zipfile.ZipFile) -> None:
    outside = [name for name in wheel.namelist()
               if not name.startswith(("keyjobs/", "keyjobs-")) or "__pycache__" in name or name.endswith(".pyc")]

    assert not outside, "the demo, the tests and compiled files stay out of the wheel"


def metadata(wheel: zipfile.ZipFile) -> str:
    [name] = [name for name in wheel.namelist() if name.endswith(".dist-info/METADATA")]
    return wheel.read(name).decode()


def test_the_wheel_holds_the_license_and_the_typed_marker(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()

    assert "keyjobs/py.typed" in names, "without py.typed, mypy ignores keyjobs' annotations in a project"
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names), names
    assert "License-Expression: MIT" in metadata(wheel)


def test_the_wheels_version_is_keyjobs_version(wheel: zipfile.ZipFile) -> None:
    import keyjobs

    assert f"\nVersion: {keyjobs.__version__}\n" in metadata(wheel)


def test_the_classifiers_name_the_stacks_ci_runs(wheel: zipfile.ZipFile) -> None:
    """The Makefile's default stack and .ci/run's second one: Django and Python, each with its classifier."""
    makefile = (ROOT / "Makefile").read_text()
    primary_django = re.search(r"^DJANGO\s+\?=\s+(\S+)", makefile, re.M).group(1)  # type: ignore[union-attr]
    primary_python = ".".join((ROOT / ".python-version").read_text().strip().split(".")[:2])
    [(second_django, second_python)] = re.findall(r"\bDJANGO=(\S+) PY=(\d+\.\d+)", (ROOT / ".ci" / "run").read_text())
    classifiers = {line.removeprefix("Classifier: ") for line in metadata(wheel).splitlines() if line.startswith("Classifier: ")}

    for django in (primary_django, second_django):
        assert f"Framework :: Django :: {django}" in classifiers
    for python in (primary_python, second_python):
        assert f"Programming Language :: Python :: {python}" in classifiers
    assert "Typing :: Typed" in classifiers
