"""fairseq-rshare-compress: an rshare checkpoint fitted to a trained dense model.

DENSE.pt is a checkpoint of an rshare architecture trained with --rshare-tables none, or a
stock fairseq checkpoint of a parent architecture (lstm_lm, lstm, transformer,
transformer_iwslt_de_en, transformer_lm), for which the rshare architecture of that parent is
built.  The rshare model takes the dense model's options and the --rshare-* flags given (the
rest at the architecture's defaults, as fairseq-train gives them); every weight that is not a
table is copied, and every dense key must find its place.  Each random-shared table's pool
(and word scales) is the least-squares fit of the dense table under its mapping, the random
one or one learned by k-means (fairseq_rshare/compress.py); an output bias comes from the
dense output layer's bias, or starts at zero.  OUT.pt is a fairseq checkpoint of that model
with no optimizer state, starting at update 0 and epoch 1.
"""
import argparse
import os
import sys
import tempfile
from dataclasses import fields

import torch
from fairseq import utils
from fairseq.dataclass.utils import merge_with_parent
from fairseq.logging import metrics
from fairseq.models import MODEL_DATACLASS_REGISTRY
from omegaconf import OmegaConf

from .. import compress as fitting
from ..errors import RShareConfigError
from ..mapping import LEARNED_MAPPINGS, fingerprint, learned_mapping_size
from ..models.rshare_config import RShareConfig, add_rshare_args
from ..modules import RandomSharedEmbedding, RandomSharedOutput
from ..modules.random_shared_embedding import STORED_MAPPING_DTYPE, fingerprint_parts
from .export import PARENT_ARCHS, checkpoint_model, checkpoint_task, read_checkpoint

# The rshare architecture built for each stock parent (the presets share lstm_lm: the base one).
RSHARE_ARCH_OF_PARENT = {parent: arch for arch, parent in PARENT_ARCHS.items() if arch == "rshare_" + parent}

OUTPUT_TABLE = ".output_projection.table"


def rshare_arch(arch, path):
    """The rshare architecture to build for a dense checkpoint of `arch`."""
    if arch in PARENT_ARCHS:
        return arch
    if arch in RSHARE_ARCH_OF_PARENT:
        return RSHARE_ARCH_OF_PARENT[arch]
    raise RShareConfigError(
        f"{path} has architecture {arch}: compress a stock fairseq checkpoint of "
        f"{', '.join(RSHARE_ARCH_OF_PARENT)}, or an rshare one trained with --rshare-tables none"
    )


def rshare_model_cfg(model_cfg, arch, flags):
    """The dense model's options for the rshare `arch`, its --rshare-* options replaced by
    `flags` (those not given take the architecture's defaults, as in fairseq-train)."""
    legacy = isinstance(model_cfg, argparse.Namespace)  # an argparse-based architecture
    options = dict(vars(model_cfg)) if legacy else OmegaConf.to_container(model_cfg, resolve=True)
    for option in fields(RShareConfig):
        options.pop(option.name, None)
    options.update(flags, _name=arch)
    if legacy:
        options["arch"] = arch
        return argparse.Namespace(**options)
    return merge_with_parent(MODEL_DATACLASS_REGISTRY[arch](), OmegaConf.create(options))


def random_shared_tables(model):
    """[(table, the names it goes by)] of the model's random-shared tables, each once."""
    names = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, RandomSharedEmbedding):
            names.setdefault(id(module), (module, []))[1].append(name)
    return list(names.values())


def dense_key(name, dense_state):
    """The dense weight that the random-shared table at `name` stands for: an embedding's
    weight, or the output layer's (a transformer's output_projection, an LSTM's fc_out, or,
    tied in an LSTM, the input table)."""
    if not name.endswith(OUTPUT_TABLE):
        return f"{name}.weight"
    for key in ("decoder.output_projection.weight", "decoder.fc_out.weight"):
        if key in dense_state:
            return key
    return "decoder.embed_tokens.weight"


def fit_table(table, dense, rows, kmeans_iterations, scale_iterations):
    """The table's weights fitted to `dense` (V x H) over `rows`, its mapping, and its
    relative reconstruction error."""
    if not table.stores_mapping:
        mapping, centroids = table.mapping, None
    else:
        mapping, centroids = fitting.learned_mapping(
            dense, table.layout, balanced=LEARNED_MAPPINGS[table.mapping_kind],
            iterations=kmeans_iterations, seed=table.seed,
        )
    pool, scales = fitting.fit_pool(dense, mapping, table.pool_size, table.word_scale is not None,
                                    scale_iterations, rows, centroids)
    weights = {"pool": pool.to(table.pool.dtype)}
    if scales is not None:
        weights["word_scale"] = scales.to(table.word_scale.dtype)
    if table.stores_mapping:
        weights["stored_mapping"] = mapping.to(STORED_MAPPING_DTYPE)
        weights["mapping_fingerprint"] = torch.tensor(fingerprint_parts(fingerprint(mapping.numpy())))
    error = fitting.relative_error(dense, fitting.reconstruct(pool, mapping, scales), rows)
    return weights, error


def table_report(table, names, error):
    V, H, K, M = table.num_embeddings, table.embedding_dim, table.num_subvectors, table.pool_size
    parameters = table.pool.numel() + (table.word_scale.numel() if table.word_scale is not None else 0)
    if not table.stores_mapping:
        mapping = "mapping 0 bytes (regenerated from --rshare-seed)"
    else:
        bits, size = learned_mapping_size(V, K, M, table.pool_kind)
        mapping = f"mapping {size:,} bytes ({bits // (V * K)} bits a slot, {table.mapping_kind})"
    return (f"{' = '.join(names)}: V={V} H={H} K={K} M={M} ({table.pool_kind}): {parameters:,} "
            f"parameters (dense {V * H:,}), {mapping}; relative error {error:.4f}")


def fitted_state(model, dense_state, kmeans_iterations, scale_iterations):
    """The rshare model's weights: every table fitted, everything else copied from the dense
    weights, each of which must find its place; and a report line per table."""
    state, used, fitted, reports = model.state_dict(), set(), set(), []
    for table, names in random_shared_tables(model):
        keys = [dense_key(name, dense_state) for name in names]
        rows = torch.ones(table.num_embeddings, dtype=torch.bool)
        if table.padding_idx is not None and not any(name.endswith(OUTPUT_TABLE) for name in names):
            rows[table.padding_idx] = False  # an input table's pad vector is zeroed when used
        weights, error = fit_table(table, dense_state[keys[0]], rows, kmeans_iterations, scale_iterations)
        for name in names:
            for suffix, tensor in weights.items():
                state[f"{name}.{suffix}"] = tensor
            fitted.update(key for key in state if key.startswith(name + "."))
        used.update(keys)
        reports.append(table_report(table, names, error))
    output = getattr(model.decoder, "output_projection", None)
    if isinstance(output, RandomSharedOutput) and output.bias is not None:
        bias = dense_state.get("decoder.fc_out.bias")
        state["decoder.output_projection.bias"] = torch.zeros_like(output.bias) if bias is None else bias
        fitted.add("decoder.output_projection.bias")
        used.add("decoder.fc_out.bias")
    for key in state.keys() - fitted:
        if key not in dense_state or dense_state[key].shape != state[key].shape:
            raise RShareConfigError(f"the dense model has no weight {key} of shape {tuple(state[key].shape)}, "
                                    "which the rshare model needs: compress a checkpoint of the same architecture")
        state[key] = dense_state[key].to(state[key].dtype)
        used.add(key)
    unused = sorted(dense_state.keys() - used)
    if unused == ["decoder.fc_out.bias"]:
        raise RShareConfigError("the dense output layer has a bias (decoder.fc_out.bias): add --rshare-output-bias to keep it")
    if unused:
        raise RShareConfigError(f"the dense weights {', '.join(unused)} have no place in the rshare model "
                                "(see --rshare-tables)")
    return state, reports


def validation(task, model, cfg):
    """(loss, perplexity) of `model` on the first --valid-subset, as fairseq-train's validation
    reports them: the task's batches in order (an LSTM's state carried across them under
    --task stateful_lm) through its valid_step and the checkpoint's criterion."""
    subset = cfg.dataset.valid_subset.split(",")[0]
    task.load_dataset(subset, combine=False, epoch=1)
    criterion = task.build_criterion(cfg.criterion)
    batches = task.get_batch_iterator(
        dataset=task.dataset(subset),
        max_tokens=cfg.dataset.max_tokens_valid,
        max_sentences=cfg.dataset.batch_size_valid,
        max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions()),
        ignore_invalid_inputs=cfg.dataset.skip_invalid_size_inputs_valid_test,
        required_batch_size_multiple=cfg.dataset.required_batch_size_multiple,
        seed=cfg.common.seed,
        epoch=1,
        disable_iterator_cache=True,
    ).next_epoch_itr(shuffle=False)
    logging_outputs = [task.valid_step(sample, model, criterion)[2] for sample in batches]
    with metrics.aggregate(new_root=True) as aggregated:
        task.reduce_metrics(logging_outputs, criterion)
    values = aggregated.get_smoothed_values()
    return values["loss"], values["ppl"]


def checkpoint_of(model, model_cfg, state):
    """What fairseq-train would save for `model`, with no optimizer state, at update 0 and
    epoch 1 (the dense run's criterion and optimizer names kept)."""
    cfg = OmegaConf.to_container(state["cfg"], resolve=True, enum_to_str=True)
    legacy = isinstance(model_cfg, argparse.Namespace)
    cfg["model"] = model_cfg if legacy else OmegaConf.to_container(model_cfg, resolve=True, enum_to_str=True)
    last = (state.get("optimizer_history") or [{}])[-1]
    return {
        "args": None,
        "cfg": cfg,
        "model": model.state_dict(),
        "optimizer_history": [{
            "criterion_name": last.get("criterion_name"),
            "optimizer_name": last.get("optimizer_name"),
            "lr_scheduler_state": {"best": None},
            "num_updates": 0,
        }],
        "extra_state": {"train_iterator": {"epoch": 1, "iterations_in_epoch": 0, "version": 2, "shuffle": True}},
    }


def save_replacing(checkpoint, path):
    """torch.save to `path` through a temporary file beside it, renamed only once written."""
    handle, temporary = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".pt.tmp")
    os.close(handle)
    try:
        torch.save(checkpoint, temporary)
        os.replace(temporary, path)
    except BaseException:
        os.remove(temporary)
        raise


def compress(dense_path, output, flags, data=None, kmeans_iterations=20, scale_iterations=10, report=print):
    """Write the rshare checkpoint fitted to `dense_path` to `output`; return its architecture."""
    if os.path.exists(output) and os.path.realpath(output) == os.path.realpath(dense_path):
        raise RShareConfigError(f"{output} is the dense checkpoint itself: write the rshare one elsewhere")
    if not os.path.isdir(os.path.dirname(os.path.abspath(output))):
        raise RShareConfigError(f"the folder of {output} does not exist")
    if kmeans_iterations < 1 or scale_iterations < 0:
        raise RShareConfigError("--kmeans-iterations must be at least 1 and --scale-iterations at least 0")
    state, dense_arch = read_checkpoint(dense_path, data)
    arch = rshare_arch(dense_arch, dense_path)
    task = checkpoint_task(state)
    dense = checkpoint_model(task, state)
    if any(isinstance(module, RandomSharedEmbedding) for module in dense.modules()):
        raise RShareConfigError(f"{dense_path} already random-shares a table: compress a model trained "
                                "with --rshare-tables none")
    model_cfg = rshare_model_cfg(state["cfg"]["model"], arch, flags)
    model = task.build_model(model_cfg)
    if not random_shared_tables(model):
        raise RShareConfigError("--rshare-tables none leaves nothing to compress: name the tables to random-share")
    weights, reports = fitted_state(model, dense.state_dict(), kmeans_iterations, scale_iterations)
    model.load_state_dict(weights, strict=True, model_cfg=model_cfg)
    for line in reports:
        report(line)
    if data:
        for name, candidate in (("dense", dense), ("compressed", model)):
            loss, perplexity = validation(task, candidate, state["cfg"])
            report(f"validation ({name}, before fine-tuning): loss {loss:.3f} (base 2), perplexity {perplexity:.2f}")
    save_replacing(checkpoint_of(model, model_cfg, state), output)
    return arch


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="fairseq-rshare-compress",
        description="Fit an rshare model to a trained dense checkpoint (an rshare one trained with "
        "--rshare-tables none, or a stock lstm_lm, lstm, transformer or transformer_lm one) and "
        "write it as a checkpoint to fine-tune with fairseq-train --finetune-from-model.",
    )
    parser.add_argument("dense", help="the dense checkpoint")
    parser.add_argument("output", help="where to write the rshare checkpoint")
    parser.add_argument("--data", help="the fairseq-preprocess folder with the model's dictionaries "
                        "(default: the one recorded in the checkpoint); given, the validation loss of "
                        "both models is reported")
    parser.add_argument("--kmeans-iterations", type=int, default=20,
                        help="Lloyd iterations of --rshare-mapping kmeans / kmeans-balanced (at most)")
    parser.add_argument("--scale-iterations", type=int, default=10,
                        help="alternations of the least-squares fit with --rshare-word-scale")
    add_rshare_args(parser.add_argument_group(
        "rshare model", "the --rshare-* flags, as fairseq-train takes them (unset: the architecture's defaults)",
        argument_default=argparse.SUPPRESS,
    ))
    args = parser.parse_args(argv)
    flags = {option.name: getattr(args, option.name) for option in fields(RShareConfig) if hasattr(args, option.name)}
    try:
        arch = compress(args.dense, args.output, flags, args.data, args.kmeans_iterations, args.scale_iterations)
    except RShareConfigError as error:
        sys.exit(f"fairseq-rshare-compress: error: {error}")
    print(f"fairseq-rshare-compress: wrote {args.output}, an {arch} checkpoint "
          f"({os.path.getsize(args.output):,} bytes)")


if __name__ == "__main__":
    main()
