"""VHU_DEBUG=1 builds the core with C assertions and Cython bounds checks."""
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_debug_build_compiles_and_moves_frames(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", "build", "*.so", "*.c", "__pycache__", ".hypothesis", "*.egg-info"))
    env = dict(os.environ, VHU_DEBUG="1")
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=src,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    env = dict(os.environ, PYTHONPATH=str(src))
    check = "from vhu import _ring; assert _ring.DEBUG_BUILD; print('debug ok')"
    r = subprocess.run([sys.executable, "-c", check], cwd=src, capture_output=True, text=True,
                       timeout=60, env=env)
    assert r.returncode == 0 and "debug ok" in r.stdout, r.stdout + r.stderr
    # The demo: vhu.master's workers and vhu.frontend, all debug-built, move
    # frames and check each one that comes back.
    r = subprocess.run([sys.executable, "-m", "vhu.demo", "--seconds", "1"], cwd=src,
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and "counts agree" in r.stdout, r.stdout + r.stderr
