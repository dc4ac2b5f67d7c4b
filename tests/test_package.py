"""The source distribution: complete metadata, and its own tests pass from it.

The sdist is built here with hatchling (the project's build backend), without
network, and unpacked; its metadata must declare the Python running these
tests and typing, and the multi-device tests must pass from the unpacked tree
alone (they need the root conftest.py's fake devices).
"""

import email
import os
import pathlib
import subprocess
import sys
import tarfile

import pytest
import trove_classifiers

pytestmark = pytest.mark.subprocess  # hatchling builds the sdist

ROOT = pathlib.Path(__file__).resolve().parents[1]
TESTS = ["tests/test_sharding.py"]


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
  out = tmp_path_factory.mktemp("dist")
  subprocess.run(
    [sys.executable, "-m", "hatchling", "build", "-t", "sdist", "-d", str(out)],
    cwd=ROOT,
    check=True,
    capture_output=True,
    timeout=300,
  )
  (archive,) = out.glob("optax_ema-*.tar.gz")
  with tarfile.open(archive) as tar:
    tar.extractall(out, filter="data")
  (tree,) = [p for p in out.iterdir() if p.is_dir()]
  return tree


def _metadata(tree):
  return email.message_from_string((tree / "PKG-INFO").read_text(encoding="utf-8"))


def test_classifiers_declare_this_python_typing_and_status(sdist):
  classifiers = _metadata(sdist).get_all("Classifier")
  assert set(classifiers) <= trove_classifiers.classifiers
  version = f"{sys.version_info.major}.{sys.version_info.minor}"
  assert f"Programming Language :: Python :: {version}" in classifiers
  assert "Typing :: Typed" in classifiers
  assert any(c.startswith("Development Status ::") for c in classifiers)
  assert any(c.startswith("Topic ::") for c in classifiers)


def test_no_invented_urls(sdist):
  meta = _metadata(sdist)
  assert meta.get_all("Project-URL") is None and meta.get("Home-page") is None


def test_sdist_ships_the_typing_marker_and_the_root_conftest(sdist):
  assert (sdist / "optax_ema" / "py.typed").is_file()
  assert (sdist / "conftest.py").read_bytes() == (ROOT / "conftest.py").read_bytes()


def test_sharding_tests_pass_from_the_unpacked_sdist(sdist):
  env = {**os.environ, "PYTHONPATH": str(sdist), "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)  # the unpacked conftest.py must set the devices
  where = subprocess.run(
    [sys.executable, "-c", "import optax_ema; print(optax_ema.__file__)"],
    cwd=sdist,
    env=env,
    capture_output=True,
    text=True,
    check=True,
  ).stdout
  assert pathlib.Path(where.strip()).is_relative_to(sdist)
  result = subprocess.run(
    [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS],
    cwd=sdist,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert " passed" in result.stdout and "skipped" not in result.stdout
