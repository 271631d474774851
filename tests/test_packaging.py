"""The wheel: what ``pip install /path/to/keyjobs`` installs must hold every file of the package git tracks.

An editable install reads templates and static files from the checkout, so a
file missing from ``package-data`` shows up only once installed from a wheel:
the admin's overrides under ``templates/admin/keyjobs/`` went missing that way.
The wheel is built by pip from a copy of the tracked files, so that the build
leaves nothing in the checkout and sees nothing git does not track.
"""

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
