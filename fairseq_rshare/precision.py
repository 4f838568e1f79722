"""--fp16 and --bf16 training, checked (and for --bf16 on a GPU, made possible) before fairseq's
Trainer starts, in command-line runs only.

fairseq 0.12 reads --bf16 as "train on a TPU" (it sets --tpu), so without torch_xla a --bf16 run
stops with a traceback through torch_xla's absence; here it trains on the CUDA GPU (in bfloat16,
fp32 master weights, as fairseq's TPU path) or, with --cpu or without a GPU, on the CPU, where
the fp32 master copy is kept per parameter (the flat copy is a CUDA one).  --fp16 keeps fairseq's
fp16 optimizer, whose loss scaling needs a CUDA GPU: without one it stops with one line.
"""
import functools
import importlib.util

import torch
from fairseq.trainer import Trainer

from .errors import RShareConfigError


def on_cuda(common):
    return torch.cuda.is_available() and not common.cpu


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


_fairseq_trainer_init = Trainer.__init__


@functools.wraps(_fairseq_trainer_init)
def trainer_init(self, cfg, *args, **kwargs):
    check_precision(cfg)
    _fairseq_trainer_init(self, cfg, *args, **kwargs)


def install():
    Trainer.__init__ = trainer_init
