"""Fused CPU kernels for the random-shared output layer (float32).

A word's logit is the sum of K pool scores, ``logit[n, w] = sum_k scores[n, mapping_columns[w, k]]
(+ bias[w])``, where ``mapping_columns`` is the table's mapping written as columns of the (N, R)
score table.  Two fused functions of it, each with its backward:

- :func:`log_softmax_of_words` writes the (N, V) log-probabilities (what fairseq's generator,
  eval-lm and stock criteria consume);
- :func:`logsumexp_of_words` returns only the (N,) log-normalisers, which with the target's
  logit is the cross-entropy: nothing of size N x V is ever written (``RandomSharedOutput.loss``).

The kernels take 8 tokens at a time with their scores interleaved (R x 8), so that one loaded
slot index and one 32-byte load serve all 8 tokens, and walk the vocabulary in chunks that
stay in cache.  In training, :func:`logsumexp_of_words` computes its gradient in the forward
pass, keeping each tile's logits (V x 8 floats a thread) between the two; every other
backward recomputes the logits instead of storing them.  They are compiled
with ``torch.utils.cpp_extension`` on first use (about a minute, said on stderr) into a folder
named by :func:`build_key`, with a manifest of the library's size and sha256, then loaded from
it once checked against the manifest; a damaged build is rebuilt.  Where building fails, or for
other dtypes and devices, stock PyTorch ops compute the same values.
"""
import contextlib
import fcntl
import functools
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
import torch.nn.functional as F

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


def _bias_or_empty(scores, bias):
    return bias.float().contiguous() if bias is not None else scores.new_empty(0)


def first_order_only(backward):
    """The kernels' backward has no derivative of its own.  A backward pass that builds a graph
    (``create_graph=True``, for a second derivative) stops here with a message; torch's
    ``once_differentiable`` would let it through when the incoming gradient is a constant, and
    the second derivative would silently miss the kernels' part."""
    @functools.wraps(backward)
    def checked(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "fairseq_rshare: the fused output kernels are once differentiable: no second "
                "derivative (create_graph=True); use float64 inputs (stock ops) for that"
            )
        return backward(ctx, *grads)
    return checked


class FusedLogSoftmaxOfWords(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, mapping_columns, bias):
        bias = _bias_or_empty(scores, bias)
        lprobs = extension().log_softmax_forward(scores, mapping_columns, bias)
        ctx.save_for_backward(lprobs, scores, mapping_columns, bias)
        return lprobs

    @staticmethod
    @first_order_only
    def backward(ctx, grad):
        lprobs, scores, mapping_columns, bias = ctx.saved_tensors
        grad_scores, grad_bias = extension().log_softmax_backward(grad.contiguous(), lprobs, scores, mapping_columns, bias)
        return grad_scores, None, grad_bias if bias.numel() else None


class FusedLogSumExpOfWords(torch.autograd.Function):
    """The log-normalisers.  Given the gradient they are expected to receive (up to one
    factor), the forward computes that gradient in the same pass over the vocabulary; the
    backward scales it when the incoming gradient is proportional to the expected one, and
    otherwise recomputes the logits."""

    @staticmethod
    def forward(ctx, scores, mapping_columns, bias, expected_grad):
        bias = _bias_or_empty(scores, bias)
        ctx.precomputed = expected_grad is not None and (ctx.needs_input_grad[0] or ctx.needs_input_grad[2])
        if ctx.precomputed:
            expected_grad = expected_grad.float().contiguous()
            lse, grad_scores, grad_bias = extension().logsumexp_forward_backward(
                scores, mapping_columns, bias, expected_grad)
            ctx.save_for_backward(scores, mapping_columns, bias, lse, expected_grad, grad_scores, grad_bias)
        else:
            lse = extension().logsumexp_forward(scores, mapping_columns, bias)
            ctx.save_for_backward(scores, mapping_columns, bias, lse)
        return lse

    @staticmethod
    @first_order_only
    def backward(ctx, grad):
        scores, mapping_columns, bias, lse = ctx.saved_tensors[:4]
        if ctx.precomputed:
            expected_grad, grad_scores, grad_bias = ctx.saved_tensors[4:]
            factor = proportionality(grad, expected_grad)
            if factor is not None:
                if factor != 1:  # a plain sum's backward sends exactly the expected gradient
                    grad_scores, grad_bias = factor * grad_scores, factor * grad_bias
                return grad_scores, None, grad_bias if bias.numel() else None, None
        grad_scores, grad_bias = extension().logsumexp_backward(grad.contiguous(), scores, mapping_columns, bias, lse)
        return grad_scores, None, grad_bias if bias.numel() else None, None


def proportionality(grad, expected, tolerance=1e-6):
    """The factor c with grad = c * expected (to `tolerance` of grad's largest entry), or None."""
    grad = grad.float()
    norm = expected.dot(expected)
    factor = grad.dot(expected) / norm if norm > 0 else grad.new_zeros(())
    if (grad - factor * expected).abs().max() <= tolerance * grad.abs().max():
        return factor
    return None


def _fused(scores):
    return scores.dtype == torch.float32 and scores.device.type == "cpu" and extension() is not None


def log_softmax_of_words(scores, mapping_columns, bias=None):
    """log_softmax over words of sum_k scores[:, mapping_columns[w, k]] (+ bias); scores is (N, R),
    ``mapping_columns`` the (V, K) int32 table of score columns.  Returns (N, V)."""
    if _fused(scores):
        return FusedLogSoftmaxOfWords.apply(scores.contiguous(), mapping_columns, bias)
    return F.log_softmax(stock_word_logits(scores, mapping_columns, bias), dim=-1)


def logsumexp_of_words(scores, mapping_columns, bias=None, expected_grad=None):
    """logsumexp over words of the same logits; returns (N,), never building (N, V).

    ``expected_grad`` (N,): the gradient the result will receive, up to one factor; ones (what
    ``.sum()`` sends) by default.  The fused kernels then compute the gradient in the forward
    pass, which saves the backward a second pass over the vocabulary; any other incoming
    gradient is still exact, through that second pass."""
    if _fused(scores):
        if expected_grad is None and torch.is_grad_enabled():
            expected_grad = scores.new_ones(scores.shape[0])
        return FusedLogSumExpOfWords.apply(scores.contiguous(), mapping_columns, bias, expected_grad)
    return torch.logsumexp(stock_word_logits(scores, mapping_columns, bias), dim=-1)


def stock_word_logits(scores, mapping_columns, bias=None):
    """The (N, V) logits with stock ops: ``embedding_bag`` over the transposed score table."""
    logits = F.embedding_bag(mapping_columns, scores.t(), mode="sum").t()
    return logits + bias if bias is not None else logits
