"""Building and caching the fused CPU kernels' C++ extension (source: output_cpu.cpp).

They are compiled with ``torch.utils.cpp_extension`` on first use (about a minute, said on
stderr) into a folder named by :func:`build_key`, with a manifest of the library's size and
sha256, then loaded from it once checked against the manifest; a damaged build is rebuilt.
Where building fails, :func:`extension` says so once and returns None.
"""
import contextlib
import fcntl
import glob
import hashlib
import importlib.util
import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

import torch

logger = logging.getLogger(__name__)

SOURCE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "output_cpu.cpp")
with open(SOURCE_FILE) as _source:
    CPP_SOURCE = _source.read()


FUNCTIONS = ["logsumexp_forward", "logsumexp_backward", "logsumexp_forward_backward", "log_softmax_forward", "log_softmax_backward"]
# Portable flags: the binary runs on any CPU of its architecture, so a cache copied to another
# machine still works.  The exponentials, the kernels' largest cost as scalar std::exp calls,
# are computed four at a time by the source's own exp4 (vector extensions, SSE on the baseline)
# rather than by -ffast-math, which would let the compiler assume there are no infinities
# (LogSumExp starts from -inf).
CFLAGS = ["-O3", "-fopenmp"]
LDFLAGS = ["-fopenmp"]
MANIFEST = "manifest.json"  # the library's size and sha256, written after a successful build

_extension = None
_extension_failed = False


def compiler_version():
    """First line of ``$CXX --version``: torch builds with $CXX, else ``c++``."""
    command = shlex.split(os.environ.get("CXX", "c++")) + ["--version"]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()[0]


def build_inputs():
    """Everything that changes the compiled binary, here and now, save the compiler: a finished
    build is found without one (a cache copied to a machine that has none), and the compiler
    that made it is recorded in its manifest."""
    return {
        "source": [CPP_SOURCE, FUNCTIONS],
        "flags": [CFLAGS, LDFLAGS],
        "torch": torch.__version__,
        "python": sys.implementation.cache_tag + getattr(sys, "abiflags", ""),
        "machine": platform.machine(),
    }


def build_key(inputs):
    """12 hex digits naming a build of the kernels: one folder per source, flags, torch, python
    and machine, so builds for any other of these sharing a cache never meet."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:12]


def _load_or_build():
    """Import the kernels from the folder of this build key, building them there first if its
    library is missing, damaged or does not load.  A finished build is imported directly,
    without running ninja or the compiler."""
    from torch.utils.cpp_extension import LIB_EXT, get_default_build_root

    name = "fairseq_rshare_fused_" + build_key(build_inputs())
    folder = os.path.join(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root(), name)
    library = os.path.join(folder, name + LIB_EXT)
    module, _ = _load_recorded(name, library)
    if module is None:
        os.makedirs(folder, exist_ok=True)
        with _build_lock(folder):
            module, problem = _load_recorded(name, library)  # built meanwhile by the process waited for
            if module is None:
                module = _build(name, library, problem)
    return module


def _load_recorded(name, library):
    """(module, None) for the finished build of `library`, else (None, why not).  The library is
    checked against its manifest first: a truncated one would kill the process when loaded."""
    if not os.path.exists(library):
        return None, "not built yet"
    try:
        with open(os.path.join(os.path.dirname(library), MANIFEST)) as file:
            recorded = json.load(file)
        with open(library, "rb") as file:
            content = file.read()
    except (OSError, ValueError) as error:
        return None, f"{library} has no readable manifest of a finished build ({error})"
    found = len(content), hashlib.sha256(content).hexdigest()
    if found != (recorded.get("size"), recorded.get("sha256")):
        return None, (f"{library} is damaged: {found[0]} bytes of sha256 {found[1][:12]}, its manifest records "
                      f"{recorded.get('size')} bytes of sha256 {str(recorded.get('sha256'))[:12]}")
    try:
        spec = importlib.util.spec_from_file_location(name, library)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except ImportError as error:  # built by another toolchain, whose runtime this machine lacks
        return None, f"the build does not load here ({error})"
    return module, None


@contextlib.contextmanager
def _build_lock(folder):
    """Held while building in `folder`: an flock, which the OS releases when its holder dies,
    however it ends (a lock file left by a killed build would make every later run wait)."""
    with open(os.path.join(folder, "build.lock"), "a") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"fairseq_rshare: waiting for another process building the fused CPU kernels in {folder} ...",
                  file=sys.stderr, flush=True)
            fcntl.flock(file, fcntl.LOCK_EX)
        yield


def _build(name, library, problem):
    """Compile in a fresh temporary folder, then install the library and its manifest, each
    written to a temporary name and renamed: a process running the previous library keeps it."""
    from torch.utils.cpp_extension import load_inline

    folder = os.path.dirname(library)
    print(f"fairseq_rshare: building the fused CPU kernels in {folder} ({problem}; once per installation, "
          "about a minute) ...", file=sys.stderr, flush=True)
    started = time.time()
    for leftover in glob.glob(os.path.join(folder, "build-*")):  # of killed or failed builds
        shutil.rmtree(leftover, ignore_errors=True)
    build_folder = tempfile.mkdtemp(prefix="build-", dir=folder)
    module = load_inline(name=name, cpp_sources=[CPP_SOURCE], functions=FUNCTIONS, extra_cflags=list(CFLAGS),
                         extra_ldflags=list(LDFLAGS), build_directory=build_folder)  # copies: torch appends to them
    with open(os.path.join(build_folder, os.path.basename(library)), "rb") as file:
        content = file.read()
    _write_and_rename(library, content)
    manifest = {key: value for key, value in build_inputs().items() if key != "source"}
    manifest.update(compiler=compiler_version(), size=len(content), sha256=hashlib.sha256(content).hexdigest())
    _write_and_rename(os.path.join(folder, MANIFEST), json.dumps(manifest, indent=1).encode())
    shutil.rmtree(build_folder, ignore_errors=True)
    print(f"fairseq_rshare: fused CPU kernels built in {time.time() - started:.0f} s", file=sys.stderr, flush=True)
    return module


def _write_and_rename(path, content):
    with open(path + ".tmp", "wb") as file:
        file.write(content)
        file.flush()
        os.fsync(file.fileno())
    os.replace(path + ".tmp", path)


def extension():
    """The compiled kernels, or None where they cannot be built (then stock ops are used)."""
    global _extension, _extension_failed
    if _extension is None and not _extension_failed:
        try:
            _extension = _load_or_build()
        except Exception as error:  # a missing compiler or ninja: fall back, say so once
            _extension_failed = True
            logger.warning("fairseq_rshare: fused output kernels unavailable (%s); using stock ops", error)
    return _extension
