"""The package as users install it: wheel and sdist from ``python -m build``, the wheel installed into a
fresh virtual environment (reusing set-up's site packages, so nothing is downloaded), then the import,
the ``parallel-bridge`` command, vLLM's plugin entry point and the package data checked there."""

import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*cmd, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    pytest.importorskip("build")
    dist, src = tmp_path_factory.mktemp("dist"), tmp_path_factory.mktemp("src") / "parallel_bridge"
    # a copy: setuptools writes build/ and *.egg-info beside the sources it builds
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".*", "build", "dist", "out", "*.egg-info", "__pycache__"))
    run(sys.executable, "-m", "build", "--no-isolation", "--wheel", "--sdist", "--outdir", dist, src)
    (wheel,), (sdist,) = dist.glob("*.whl"), dist.glob("*.tar.gz")
    return wheel, sdist


@pytest.mark.slow
def test_wheel_and_sdist_hold_the_package(built):
    wheel, sdist = built
    names = zipfile.ZipFile(wheel).namelist()
    for member in ("parallel_bridge/__init__.py", "parallel_bridge/py.typed", "parallel_bridge/sync/receiver.py", "parallel_bridge/spec/schema.py"):
        assert member in names, member
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[vllm.general_plugins]" in text and "parallel_bridge = parallel_bridge.plugin:register" in text
    assert "parallel-bridge = parallel_bridge.cli.main:main" in text
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "Provides-Extra: cpu" in metadata and 'Requires-Dist: vllm<0.33,>=0.32; extra == "vllm"' in metadata
    members = tarfile.open(sdist).getnames()
    top = members[0].split("/")[0]
    for member in ("pyproject.toml", "README.md", "parallel_bridge/cli/main.py"):
        assert f"{top}/{member}" in members, member


@pytest.mark.slow
def test_wheel_installs_and_runs_in_a_fresh_venv(built, tmp_path):
    wheel, _ = built
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    py = venv / "bin" / "python"
    site = Path(run(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    # set-up's packages (torch, vLLM...) on the path after the fresh ones; its .pth files (this checkout's
    # editable install) are not processed, so parallel_bridge can only come from the wheel
    (site / "setup_stack.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(py, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel)
    probe = run(
        py,
        "-c",
        "import importlib.metadata as m, pathlib, parallel_bridge; "
        "print(parallel_bridge.__file__); "
        "print([e.value for e in m.entry_points(group='vllm.general_plugins') if e.name == 'parallel_bridge']); "
        "print((pathlib.Path(parallel_bridge.__file__).parent / 'py.typed').exists())",
        cwd=tmp_path,
    ).stdout.splitlines()
    assert probe[0].startswith(str(site)), probe
    assert probe[1] == "['parallel_bridge.plugin:register']" and probe[2] == "True", probe
    cli = run(venv / "bin" / "parallel-bridge", "--help", cwd=tmp_path).stdout
    assert "inspect" in cli and "convert" in cli and "serve" in cli
