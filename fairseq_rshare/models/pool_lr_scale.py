"""--pool-lr-scale S, a flag of every rshare architecture, under every task.

It trains the rshare pools (the shared sub-vectors) at S times the learning rate of every
other weight: each update's step of the pools, taken after gradient clipping, is scaled by S.
That equals a learning rate of S x --lr for the pools under every optimizer whose step is
proportional to its rate (SGD with or without momentum, NAG, Adam, Adagrad); the optimizer's
state and checkpoints are the same as without it.  fairseq has no per-model optimizer hook, so
building the model wraps its task's optimizer_step (the step every fairseq trainer calls).
"""
from dataclasses import dataclass, field

import torch
from fairseq.dataclass import FairseqDataclass
from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.optim import FP16Optimizer, MemoryEfficientFP16Optimizer

from ..errors import RShareConfigError
from ..modules import RandomSharedEmbedding


@dataclass
class PoolLRScaleConfig(FairseqDataclass):
    pool_lr_scale: float = field(
        default=1.0, metadata={"help": "learning rate of the rshare pools as a multiple of --lr (1: the same)"}
    )


def add_pool_lr_scale_arg(parser):
    gen_parser_from_dataclass(parser, PoolLRScaleConfig())


def pools_of(model):
    """The model's rshare pools, each once (a tied table is one module)."""
    return [module.pool for module in model.modules() if isinstance(module, RandomSharedEmbedding)]


class PoolScaledOptimizerStep:
    """A task's optimizer_step, with the pools' step then scaled by `scale`."""

    def __init__(self, optimizer_step, scale):
        self.optimizer_step, self.scale = optimizer_step, scale

    def __call__(self, optimizer, model, update_num):
        if self.scale == 1:
            return self.optimizer_step(optimizer, model, update_num)
        if isinstance(optimizer, (FP16Optimizer, MemoryEfficientFP16Optimizer)):
            raise RShareConfigError("--pool-lr-scale scales the step of fp32 weights: drop --fp16/--bf16 (or the scale)")
        pools = pools_of(model)
        before = [pool.detach().clone() for pool in pools]
        self.optimizer_step(optimizer, model, update_num)
        with torch.no_grad():
            for pool, old in zip(pools, before):
                pool.lerp_(old, 1 - self.scale)  # old + scale * (new - old)


def scale_pool_steps(task, model, args):
    """Make `task` train the pools of `model` at --pool-lr-scale times the learning rate."""
    scale = getattr(args, "pool_lr_scale", 1.0)
    if not scale > 0:
        raise RShareConfigError(f"--pool-lr-scale {scale}: give a number > 0 (1: the pools learn at --lr)")
    if scale != 1 and not pools_of(model):
        raise RShareConfigError("--pool-lr-scale needs rshare tables: drop it for a dense model (--rshare-tables none)")
    step = getattr(task, "optimizer_step", None)
    if isinstance(step, PoolScaledOptimizerStep):
        step.scale = scale
    elif scale != 1:
        task.optimizer_step = PoolScaledOptimizerStep(step, scale)
