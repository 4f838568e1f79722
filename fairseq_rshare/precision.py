"""--fp16 and --bf16 training, checked (and for --bf16 on a GPU, made possible) before fairseq's
Trainer starts, in command-line runs only.

fairseq 0.12 reads --bf16 as "train on a TPU" (it sets --tpu), so without torch_xla a --bf16 run
stops with a traceback through torch_xla's absence; here it trains on the CUDA GPU (in bfloat16,
fp32 master weights, as fairseq's TPU path) or, with --cpu or without a GPU, on the CPU, where
the fp32 master copy is kept per parameter (the flat copy is a CUDA one).  --fp16 keeps fairseq's
fp16 optimizer, whose loss scaling needs a CUDA GPU: without one it stops with one line.

In both, fairseq's checkpoint holds the model's 16-bit weights and not the fp32 master copy, so
each resume would restart the master weights from their 16-bit rounding (a relative change of up
to 0.4 % in bfloat16) and lose the updates too small to show in 16 bits.  The optimizer state
now carries the master copy and a resume restores it; a checkpoint saved without one resumes as
before.

A CPU without AVX512-BF16 or AMX (AVX2 only, say) has no bfloat16 arithmetic: torch emulates it,
and a --bf16 run there trains about ten times slower than in float32 (a WikiText-2 LSTM on an
AVX2 EPYC: 0.2 against 2.3 updates/s), so it warns in one line.
"""
import functools
import importlib.util
import logging

import torch
from fairseq.optim.fp16_optimizer import _FP16OptimizerMixin
from fairseq.trainer import Trainer

from .errors import RShareConfigError

logger = logging.getLogger(__name__)


def on_cuda(common):
    return torch.cuda.is_available() and not common.cpu


def cpu_has_bf16():
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX tiles)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def check_precision(cfg):
    """Adjust or refuse the precision flags of cfg (fairseq's config) before the Trainer reads them."""
    common = cfg.common
    if common.fp16 and not on_cuda(common):
        raise RShareConfigError("--fp16 trains on a CUDA GPU only: drop --fp16 (or --cpu), or use --bf16 on the CPU")
    if common.bf16 and common.tpu and importlib.util.find_spec("torch_xla") is None:
        common.tpu = False
        if not on_cuda(common):
            common.cpu = True
            common.fp16_no_flatten_grads = True
    if common.bf16 and not common.tpu and not on_cuda(common) and not cpu_has_bf16():
        logger.warning("--bf16 on a CPU without AVX512-BF16 or AMX (%s): bfloat16 is emulated and trains "
                       "slower than float32; drop --bf16", torch.backends.cpu.get_cpu_capability())


_fairseq_trainer_init = Trainer.__init__


@functools.wraps(_fairseq_trainer_init)
def trainer_init(self, cfg, *args, **kwargs):
    check_precision(cfg)
    _fairseq_trainer_init(self, cfg, *args, **kwargs)


def master_weights(optimizer):
    """The fp32 master copy of an fp16/bf16 optimizer: one tensor per parameter, or one flat
    tensor per device."""
    params = optimizer.fp32_params
    return list(params.values()) if isinstance(params, dict) else list(params)


_fairseq_state_dict = _FP16OptimizerMixin.state_dict
_fairseq_load_state_dict = _FP16OptimizerMixin.load_state_dict


@functools.wraps(_fairseq_state_dict)
def state_dict_with_master_weights(self):
    state = _fairseq_state_dict(self)
    state["fp32_params"] = [weights.detach().cpu().clone() for weights in master_weights(self)]
    return state


@functools.wraps(_fairseq_load_state_dict)
def load_state_dict_with_master_weights(self, state_dict, optimizer_overrides=None):
    saved = state_dict.get("fp32_params")
    state_dict = {key: value for key, value in state_dict.items() if key != "fp32_params"}
    _fairseq_load_state_dict(self, state_dict, optimizer_overrides)
    if saved is None:
        return
    with torch.no_grad():  # the model's weights loaded before this, so the shapes match
        for weights, saved_weights in zip(master_weights(self), saved, strict=True):
            weights.copy_(saved_weights)


def install():
    Trainer.__init__ = trainer_init
    _FP16OptimizerMixin.state_dict = state_dict_with_master_weights
    _FP16OptimizerMixin.load_state_dict = load_state_dict_with_master_weights
