"""Reading fairseq checkpoints safely, and failing clearly on a file that cannot be read.

torch >= 2.6 loads with weights_only=True; fairseq checkpoints hold argparse.Namespace (the
options of argparse-based architectures and optimizers, e.g. lstm_lm, sgd).  The plugin's loads
allow that one class for the length of each load (safe loading stays on); importing the plugin
allow-lists nothing.  fairseq's own loader shows a truncated or corrupt file as a deep traceback
from torch; wrapping it turns that into one line naming the file.
"""
import argparse
import functools
import math
import pickle
import re
import zipfile

import torch
from fairseq import checkpoint_utils

from .errors import RShareConfigError
from .mapping import learned_mapping_size
from .models.declarations import output_keys
from .modules import RandomSharedEmbedding

FAIRSEQ_GLOBALS = [argparse.Namespace]


class RShareCheckpointError(RShareConfigError):
    """A checkpoint file that cannot be read."""


_fairseq_load_checkpoint_to_cpu = checkpoint_utils.load_checkpoint_to_cpu


@functools.wraps(_fairseq_load_checkpoint_to_cpu)
def load_checkpoint_to_cpu(path, *args, **kwargs):
    try:
        with torch.serialization.safe_globals(FAIRSEQ_GLOBALS):
            return _fairseq_load_checkpoint_to_cpu(path, *args, **kwargs)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        unreadable = unreadable_checkpoint_reason(error)
        if unreadable is None:
            raise
        reason = str(error).strip().split(". ")[0] or type(error).__name__
        raise RShareCheckpointError(f"cannot read checkpoint {path} ({reason}): {unreadable}") from error


def unreadable_checkpoint_reason(error):
    """What a loading error says about the file, or None when it is not about the file (a
    RuntimeError from anything but torch's zip reader, e.g. out of memory, passes unchanged)."""
    message = str(error)
    if isinstance(error, RuntimeError) and "PytorchStreamReader" not in message:
        return None
    blocked = re.search(r"GLOBAL (\S+) whose module \S+ is blocked", message)
    if blocked:
        return (f"it holds code ({blocked.group(1)}) that torch's safe loading (weights_only) refused "
                "to run: the file may be malicious; load only checkpoints you trust")
    if "Unsupported global" in message:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", message)
        return (f"it holds a pickled {found.group(1) if found else 'object'} that torch's safe loading "
                "(weights_only) refuses; load only checkpoints you trust, saved by fairseq")
    return "the file is truncated, corrupt or not a fairseq checkpoint; copy or save it again"


_fairseq_load_checkpoint = checkpoint_utils.load_checkpoint


@functools.wraps(_fairseq_load_checkpoint)
def load_checkpoint(cfg, trainer, **passthrough_args):
    """fairseq-train's resume or --finetune-from-model, then a check that every learned mapping
    came with it.  The check runs before the first batch is read: a model forward would find the
    missing mapping too, but only once fairseq's data-loading thread runs, and a thread busy in
    torch while the interpreter exits can abort it after the one-line error."""
    loaded = _fairseq_load_checkpoint(cfg, trainer, **passthrough_args)
    for module in trainer.get_model().modules():
        if isinstance(module, RandomSharedEmbedding):
            module.check_mapping_loaded()
    return loaded


def install():
    """Make fairseq's checkpoint loader allow argparse.Namespace and fail with one line, and
    fairseq-train refuse a learned mapping no checkpoint gave (done for command-line runs only:
    fairseq-train --user-dir resumes its checkpoints through them)."""
    checkpoint_utils.load_checkpoint_to_cpu = load_checkpoint_to_cpu
    checkpoint_utils.load_checkpoint = load_checkpoint


def parameters_by_component(checkpoint):
    """Trainable parameters of the model in `checkpoint`: input tables, output layer, the rest.

    The output layer is where the arch's declaration (models/declarations.py) puts it.  Tied
    tables count once (named_parameters yields a shared tensor once, as the input).  A table
    with a stored (learned) mapping also counts the mapping: its packed bytes over 4, as many
    float32 parameters.
    """
    with torch.serialization.safe_globals(FAIRSEQ_GLOBALS):
        [model], cfg, _ = checkpoint_utils.load_model_ensemble_and_task([checkpoint])
    arch = getattr(cfg.model, "arch", None) or cfg.model._name
    return count_by_component(model, arch)


def count_by_component(model, arch):
    """parameters_by_component of a built `model` of architecture `arch`."""
    outputs = output_keys(arch)
    if outputs is None:
        raise RShareConfigError(f"architecture {arch} has no declaration in fairseq_rshare/models/declarations.py: "
                                "cannot tell its output layer")
    counts = {"input": 0, "output": 0, "body": 0}
    for name, parameter in model.named_parameters():
        if "embed_tokens" in name:
            counts["input"] += parameter.numel()
        elif any(name.startswith(key + ".") for key in outputs):
            counts["output"] += parameter.numel()
        else:
            counts["body"] += parameter.numel()
    for name, module in model.named_modules(remove_duplicate=True):
        if isinstance(module, RandomSharedEmbedding) and module.stores_mapping:
            _, stored_bytes = learned_mapping_size(module.num_embeddings, module.num_subvectors, module.pool_size,
                                                   module.pool_kind)
            component = "input" if "embed_tokens" in name else "output"
            counts[component] += math.ceil(stored_bytes / 4)
    return counts
