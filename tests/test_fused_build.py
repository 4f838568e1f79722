import os
import subprocess
import sys

from fairseq_rshare.kernels import build_inputs, build_key

INPUTS = {
    "source": ["int f();", ["f"]],
    "flags": [["-O3"], []],
    "torch": "2.13.0",
    "python": "cpython-311",
    "compiler": "c++ (Debian 12.2.0-14) 12.2.0",
    "machine": "x86_64",
}


def test_build_key_names_the_binary():
    key = build_key(INPUTS)
    assert len(key) == 12 and int(key, 16) >= 0
    assert build_key(dict(INPUTS)) == key
    for field, other in [("source", ["int f() ;", ["f"]]), ("flags", [["-O2"], []]), ("torch", "2.13.1"),
                         ("python", "cpython-312"), ("compiler", "c++ (Debian 13.1.0-1) 13.1.0"),
                         ("machine", "aarch64")]:
        assert build_key({**INPUTS, field: other}) != key, field


def test_build_inputs_are_stable():
    assert build_key(build_inputs()) == build_key(build_inputs())


def test_a_built_extension_loads_silently_without_running_ninja(tmp_path):
    """Once built, the kernels load from their folder: no message, and no ninja is run (one
    that fails comes first on PATH), so another ninja version cannot trigger a rebuild."""
    load = [sys.executable, "-c", "from fairseq_rshare.kernels import extension; assert extension() is not None"]
    subprocess.run(load, check=True, capture_output=True)  # builds, if this machine has not yet
    (tmp_path / "ninja").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "ninja").chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(load, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fairseq_rshare" not in result.stderr
