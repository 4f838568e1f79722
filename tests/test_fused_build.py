import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from fairseq_rshare.kernels import CFLAGS, LDFLAGS, build_inputs, build_key, compiler_version

INPUTS = {
    "source": ["int f();", ["f"]],
    "flags": [["-O3"], []],
    "torch": "2.13.0",
    "python": "cpython-311",
    "machine": "x86_64",
}
# The slow tests share one build of the kernels (built_cache): one worker runs them all.
pytestmark = pytest.mark.xdist_group("kernel_build")


def test_build_key_names_the_binary():
    key = build_key(INPUTS)
    assert len(key) == 12 and int(key, 16) >= 0
    assert build_key(dict(INPUTS)) == key
    for field, other in [("source", ["int f() ;", ["f"]]), ("flags", [["-O2"], []]), ("torch", "2.13.1"),
                         ("python", "cpython-312"), ("machine", "aarch64")]:
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


# The build cache, with TORCH_EXTENSIONS_DIR set to a fresh folder: one real build per session,
# copied to each test that damages it.  Every run has a timeout, so a hang fails the test.
CHECK = """
import torch
from fairseq_rshare.kernels import extension, log_softmax_of_words, stock_word_logits
if extension() is None:
    print("stock")
else:
    scores, columns = torch.randn(9, 7), torch.randint(0, 7, (11, 3), dtype=torch.int32)
    expected = torch.log_softmax(stock_word_logits(scores, columns), dim=-1)
    torch.testing.assert_close(log_softmax_of_words(scores, columns), expected)
    print("fused")
"""
BUILD_TIMEOUT = 900


def check_kernels(cache, timeout=120, **env):
    return subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "TORCH_EXTENSIONS_DIR": str(cache), **env})


def start_check(cache):
    return subprocess.Popen([sys.executable, "-c", CHECK], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TORCH_EXTENSIONS_DIR": str(cache)}, start_new_session=True)


def kill_group(process):
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:  # the group has ended
        pass
    process.communicate()


def build_folder(cache):
    (folder,) = cache.glob("fairseq_rshare_fused_*")
    return folder


def library(cache):
    return build_folder(cache) / (build_folder(cache).name + ".so")


@pytest.fixture(scope="session")
def built_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("torch_extensions")
    result = check_kernels(cache, timeout=BUILD_TIMEOUT)
    assert result.stdout.strip() == "fused", result.stderr[-3000:]
    return cache


@pytest.fixture
def cache(built_cache, tmp_path):
    shutil.copytree(built_cache, tmp_path / "torch_extensions")
    return tmp_path / "torch_extensions"


@pytest.mark.slow
def test_a_copied_cache_loads_without_a_compiler(cache):
    result = check_kernels(cache, CXX="/nonexistent")
    assert result.returncode == 0 and result.stdout.strip() == "fused", result.stderr[-3000:]
    assert "fairseq_rshare" not in result.stderr


@pytest.mark.slow
def test_a_lock_file_left_by_a_killed_build_blocks_nothing(cache):
    """torch's lock file, left where a killed build was running, beside a finished build."""
    (build_folder(cache) / "lock").touch()
    (build_folder(cache) / "build-killed").mkdir()
    (build_folder(cache) / "build-killed" / "lock").touch()
    result = check_kernels(cache)
    assert result.returncode == 0 and result.stdout.strip() == "fused", result.stderr[-3000:]
    assert "fairseq_rshare" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("damage, reason", [
    ("empty", "{library} is damaged: 0 bytes"),
    ("unrecorded", "{library} has no readable manifest"),
    ("unloadable", "the build does not load here"),  # as one from another toolchain's runtime
])
def test_a_damaged_unrecorded_or_unloadable_library_is_rebuilt(cache, damage, reason):
    """With no compiler to rebuild it, the kernels fall back to stock ops, saying why in one line."""
    manifest = build_folder(cache) / "manifest.json"
    if damage == "empty":
        library(cache).write_bytes(b"")
    elif damage == "unrecorded":
        manifest.unlink()
    else:
        library(cache).write_bytes(b"not a shared library")
        recorded = json.loads(manifest.read_text())
        recorded.update(size=20, sha256=hashlib.sha256(b"not a shared library").hexdigest())
        manifest.write_text(json.dumps(recorded))
    result = check_kernels(cache, CXX="/nonexistent")
    assert result.returncode == 0 and result.stdout.strip() == "stock", result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if "fairseq_rshare: building" in line]
    assert reason.format(library=library(cache)) in line


@pytest.mark.slow
def test_a_truncated_library_is_rebuilt(cache):
    """Loading a truncated library killed the process with a bus error."""
    content = library(cache).read_bytes()
    library(cache).write_bytes(content[: len(content) // 2])
    result = check_kernels(cache, timeout=BUILD_TIMEOUT)
    assert result.returncode == 0 and result.stdout.strip() == "fused", result.stderr[-3000:]
    assert f"{library(cache)} is damaged: {len(content) // 2} bytes" in result.stderr
    manifest = json.loads((build_folder(cache) / "manifest.json").read_text())
    rebuilt = library(cache).read_bytes()
    assert (manifest["size"], manifest["sha256"]) == (len(rebuilt), hashlib.sha256(rebuilt).hexdigest())
    assert (manifest["flags"], manifest["compiler"]) == ([CFLAGS, LDFLAGS], compiler_version())


@pytest.mark.slow
def test_a_killed_build_is_taken_over_and_a_concurrent_one_waits(tmp_path):
    """A build killed with its whole process group (as by a scheduler's time limit) while torch's
    lock file exists; then two processes at once: one builds, the other waits and loads its build."""
    builder = start_check(tmp_path)
    try:
        deadline = time.monotonic() + BUILD_TIMEOUT
        while not list(tmp_path.rglob("lock")):
            assert builder.poll() is None and time.monotonic() < deadline, "the build ended before it could be killed"
            time.sleep(0.2)
    finally:
        kill_group(builder)
    checks = [start_check(tmp_path) for _ in range(2)]
    try:
        results = [check.communicate(timeout=BUILD_TIMEOUT) for check in checks]
    finally:
        for check in checks:
            kill_group(check)
    assert [stdout.strip() for stdout, _ in results] == ["fused", "fused"], [stderr[-3000:] for _, stderr in results]
    assert sum(stderr.count("fairseq_rshare: building") for _, stderr in results) == 1
