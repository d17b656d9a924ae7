"""`pip install .` ships the CUDA sources inside the package."""
import pathlib
import subprocess
import sys
import zipfile

import pytest

from gpucnn.backends import cuda

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_wheel_contains_the_kernels(tmp_path):
    pytest.importorskip("setuptools", reason="building a wheel here needs setuptools")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                           "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    wheel = next(tmp_path.glob("gpucnn-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for filename in cuda.KERNELS:
        assert f"gpucnn/kernels/{filename}" in names
    assert "gpucnn/functional/conv.py" in names and "gpucnn/nn/layers.py" in names
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist: cupy")]
    # CuPy 14 compiles every kernel (its own too) with the CUDA headers: [ctk] brings them
    for version in ("12", "13"):
        assert any(f"cupy-cuda{version}x[ctk]>=14" in line and f'extra == "cuda{version}"' in line
                   for line in requires), requires


def test_every_kernel_file_is_listed():
    on_disk = sorted(p.name for p in (ROOT / "kernels").glob("*.cu"))
    assert on_disk == sorted(cuda.KERNELS)
