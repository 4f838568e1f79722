"""fairseq-rshare-export: turn an rshare checkpoint into a stock fairseq checkpoint.

The result is a checkpoint of the parent architecture (lstm_lm, lstm, transformer_lm,
transformer, transformer_iwslt_de_en) that stock fairseq tools and CTranslate2's fairseq converter
load without the plugin: every random-shared table becomes the dense V x H matrix it stands for
(its pad row as it is, not zeroed: the output layer scores the pad token with it, and the
log-softmax sums over it), the random-shared output layer becomes the parent's dense output
projection, the --rshare-* options go, and so does the optimizer state.  A stateful_lm model
becomes a language_modeling one, and an LSTM LM keeps no training window as its length limit
(an LSTM has none; fairseq-eval-lm silently skips samples longer than the limit).
"""
import argparse
import collections
import os
import sys
from dataclasses import fields

import torch
from fairseq import tasks
from fairseq.models.lstm_lm import DEFAULT_MAX_TARGET_POSITIONS
from fairseq.tasks.language_modeling import LanguageModelingConfig
from omegaconf import OmegaConf

from ..checkpoints import load_checkpoint_to_cpu
from ..errors import RShareConfigError
from ..models.declarations import DECLARATIONS
from ..models.rshare_config import RShareConfig
from ..modules import RandomSharedEmbedding, RandomSharedOutput
from ..tasks.stateful_lm import StatefulLMConfig

# Each rshare arch and the stock one it exports to, as its declaration says (models/declarations.py).
PARENT_ARCHS = {arch: declaration.parent for arch, declaration in DECLARATIONS.items()}
LANGUAGE_MODELING_OPTIONS = {option.name for option in fields(LanguageModelingConfig)}
PLUGIN_OPTIONS = ({option.name for option in fields(RShareConfig)} - {"_name"}) | (
    {option.name for option in fields(StatefulLMConfig)} - LANGUAGE_MODELING_OPTIONS) | {"pool_lr_scale"}
LSTM_LM_MAX_POSITIONS = int(DEFAULT_MAX_TARGET_POSITIONS)  # fairseq's own, for an lstm_lm with no window


def read_checkpoint(path, data, overrides=None):
    """The state in checkpoint `path` (its data folder replaced by `data`, when given; other
    options by `overrides`) and its architecture's name."""
    if not os.path.isfile(path):
        raise RShareConfigError(f"no checkpoint at {path}")
    overrides = {**(overrides or {}), **({"data": data} if data else {})}
    state = load_checkpoint_to_cpu(path, arg_overrides=overrides)
    model_cfg = state["cfg"]["model"] if state.get("cfg") else None
    return state, getattr(model_cfg, "arch", None) or getattr(model_cfg, "_name", None)


def checkpoint_task(state):
    """The task a checkpoint was trained on, with its dictionaries."""
    try:
        # from_checkpoint drops options the task no longer has (stateful_lm once held --pool-lr-scale).
        return tasks.setup_task(state["cfg"]["task"], from_checkpoint=True)
    except FileNotFoundError as error:
        raise RShareConfigError(
            f"cannot read the dictionary {error.filename}: pass --data with the "
            "fairseq-preprocess folder the model was trained on"
        ) from error


def checkpoint_model(task, state):
    """The model of a checkpoint, with its weights."""
    model_cfg = state["cfg"]["model"]
    model = task.build_model(model_cfg)
    model.load_state_dict(state["model"], strict=True, model_cfg=model_cfg)
    return model


def load_rshare_model(path, data):
    """The rshare model in `path` (dictionaries from `data`, else from where it was trained),
    its checkpoint state, and its architecture's name."""
    # Only the V x H matrices are needed: the materialize path compiles no kernel.
    state, arch = read_checkpoint(path, data, {"rshare_output_path": "materialize"})
    if arch not in PARENT_ARCHS:
        raise RShareConfigError(
            f"{path} is not an rshare checkpoint (architecture {arch}): "
            f"only {', '.join(PARENT_ARCHS)} export"
        )
    return checkpoint_model(checkpoint_task(state), state), state, arch


def dense_state_dict(model, parent, tied):
    """The model's weights as the stock `parent` names them, every random-shared table
    materialised; a table used in several places stays one tensor (so tying survives)."""
    state = model.state_dict()
    dense = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, RandomSharedEmbedding):
            del state[f"{name}.pool"], state[f"{name}.mapping_fingerprint"], state[f"{name}.mapping_version"]
            state.pop(f"{name}.word_scale", None)
            state.pop(f"{name}.stored_mapping", None)
            if id(module) not in dense:
                dense[id(module)] = module.materialized_weight().detach()
            if not name.endswith(".output_projection.table"):
                state[f"{name}.weight"] = dense[id(module)]
    output = model.decoder.output_projection
    if not isinstance(output, RandomSharedOutput):
        return state
    weight, bias = dense[id(output.table)], state.pop("decoder.output_projection.bias", None)
    if parent.startswith("transformer"):
        if bias is not None:
            raise RShareConfigError(
                f"the stock {parent} output layer has no bias: a model trained with "
                "--rshare-output-bias cannot be exported (retrain without it)"
            )
        state["decoder.output_projection.weight"] = weight
    elif tied:
        if bias is not None:
            raise RShareConfigError(
                f"the stock {parent} output layer has no bias when it is tied to the input "
                "table: a model trained with --rshare-output-bias and "
                "--share-decoder-input-output-embed (or --share-all-embeddings) cannot be exported"
            )
    else:
        state["decoder.fc_out.weight"] = weight
        state["decoder.fc_out.bias"] = weight.new_zeros(len(weight)) if bias is None else bias
    return state


def namespace_container(options):
    """What an argparse.Namespace of options becomes in the exported file.

    torch's weights_only loader (the default since torch 2.6, which stock fairseq does not
    change) refuses argparse.Namespace, but CTranslate2's fairseq converter reads and sets the
    options as attributes (``args.arch``, ``args.data = ...``).  An OrderedDict that holds them
    both as items (what fairseq reads, through OmegaConf) and as attributes loads safely: torch
    restores an OrderedDict's attributes, as it does for state_dict()'s ``_metadata``.
    """
    container = collections.OrderedDict(options)
    container.__dict__.update(options)
    return container


def stock_cfg(cfg, parent):
    """The checkpoint's cfg as plain containers, for the parent arch and a stock task, with
    nothing that points back at the plugin: no --rshare-* or stateful_lm options, no user dir,
    and fairseq's own name for the loss that rshare_cross_entropy computes.  Every
    argparse.Namespace (the options of an argparse-based architecture, optimizer, scheduler...:
    each holds the whole command line) gets the same treatment."""
    cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg["common"]["user_dir"] = None
    if cfg["criterion"]["_name"] == "rshare_cross_entropy":
        cfg["criterion"]["_name"] = "label_smoothed_cross_entropy"
    if cfg["task"]["_name"] == "stateful_lm":
        cfg["task"] = {key: value for key, value in cfg["task"].items() if key in LANGUAGE_MODELING_OPTIONS}
        cfg["task"]["_name"] = "language_modeling"
    limits = {"max_target_positions": LSTM_LM_MAX_POSITIONS} if parent == "lstm_lm" else {}
    cfg["task"].update(limits)
    command_line = dict(arch=parent, user_dir=None, criterion=cfg["criterion"]["_name"],
                        task=cfg["task"]["_name"], **limits)
    for section, options in cfg.items():
        legacy = isinstance(options, argparse.Namespace)
        if not (legacy or section == "model"):
            continue
        options = {key: value for key, value in (vars(options) if legacy else options).items()
                   if key not in PLUGIN_OPTIONS}
        if legacy:
            options.update(command_line)
        if section == "model":
            options["_name"] = parent
        cfg[section] = namespace_container(options) if legacy else options
    return cfg


def export(path, output, data=None):
    """Write the stock fairseq checkpoint for the rshare checkpoint `path` to `output`."""
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise RShareConfigError(f"the folder of {output} does not exist")
    if os.path.realpath(output) == os.path.realpath(path):
        raise RShareConfigError(f"{output} is the checkpoint being exported: give another output path")
    model, state, arch = load_rshare_model(path, data)
    parent = PARENT_ARCHS[arch]
    tied = bool(getattr(state["cfg"]["model"], "share_decoder_input_output_embed", False))
    weights = dense_state_dict(model, parent, tied)
    exported = {
        "args": None,
        "cfg": stock_cfg(state["cfg"], parent),
        "model": weights,
        # fairseq's loader reads these two; the optimizer state (last_optimizer_state) is dropped.
        "optimizer_history": state["optimizer_history"],
        "extra_state": state["extra_state"],
    }
    # Written beside the output, then renamed: an interrupted export leaves no partial file.
    temporary = os.path.join(folder, f".{os.path.basename(output)}.{os.getpid()}.tmp")
    try:
        torch.save(exported, temporary)
        os.replace(temporary, output)
    except OSError as error:
        raise RShareConfigError(f"cannot write {output}: {error.strerror or error}") from error
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return parent


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="fairseq-rshare-export",
        description="Write a stock fairseq checkpoint of the parent architecture (dense tables, no "
        "optimizer state) for an rshare checkpoint; it loads without --user-dir fairseq_rshare.",
    )
    parser.add_argument("checkpoint", help="an rshare checkpoint written by fairseq-train")
    parser.add_argument("output", help="where to write the stock fairseq checkpoint")
    parser.add_argument(
        "--data",
        help="the fairseq-preprocess folder with the model's dictionaries "
        "(default: the one recorded in the checkpoint)",
    )
    args = parser.parse_args(argv)
    try:
        parent = export(args.checkpoint, args.output, args.data)
    except RShareConfigError as error:
        sys.exit(f"fairseq-rshare-export: error: {error}")
    print(f"fairseq-rshare-export: wrote {args.output}, a stock {parent} checkpoint "
          f"({os.path.getsize(args.output):,} bytes)")


if __name__ == "__main__":
    main()
