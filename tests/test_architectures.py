"""How an architecture joins the plugin: decoders made of mixins, and one declaration per arch."""
import argparse

import pytest
import torch
from fairseq import options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.models import ARCH_MODEL_REGISTRY, register_model, register_model_architecture
from fairseq.models.lstm import LSTMDecoder
from fairseq.models.lstm_lm import LSTMLanguageModel
from fairseq.models.lstm_lm import base_architecture as lstm_lm_base_architecture
from fairseq.tasks import FairseqTask
from fairseq.trainer import Trainer
from fairseq_cli import train

import fairseq_rshare  # noqa: F401
from fairseq_rshare.checkpoints import count_by_component
from fairseq_rshare.models.declarations import DECLARATIONS
from fairseq_rshare.errors import RShareConfigError
from fairseq_rshare.models.pool_lr_scale import pools_of, scale_pool_steps
from fairseq_rshare.models.rshare_decoders import StatefulLSTMDecoder
from fairseq_rshare.tasks.stateful_lm import StatefulLMConfig, StatefulLMTask

from conftest import USER_DIR, tiny_lm


class CarryingLSTMDecoder(StatefulLSTMDecoder, LSTMDecoder):
    """fairseq's dense LSTMDecoder that carries its state between batches."""


@register_model("test_carrying_lstm_lm")
class CarryingLSTMLanguageModel(LSTMLanguageModel):
    """fairseq's stock LSTM language model with the carrying decoder: no plugin code but the mixin."""

    @classmethod
    def build_model(cls, args, task):
        lstm_lm_base_architecture(args)
        return cls(CarryingLSTMDecoder(
            dictionary=task.target_dictionary, embed_dim=args.decoder_embed_dim,
            hidden_size=args.decoder_hidden_size, out_embed_dim=args.decoder_out_embed_dim,
            num_layers=args.decoder_layers, dropout_in=args.decoder_dropout_in,
            dropout_out=args.decoder_dropout_out, attention=False, encoder_output_units=0,
            max_target_positions=args.tokens_per_sample,
        ))


@register_model_architecture("test_carrying_lstm_lm", "test_carrying_lstm_lm")
def carrying_lstm_lm_architecture(args):
    lstm_lm_base_architecture(args)


def stateful_lm_args(data, arch, *flags):
    parser = options.get_training_parser()
    return options.parse_args_and_arch(parser, [
        str(data), "--user-dir", USER_DIR, "--cpu", "--task", "stateful_lm", "--arch", arch,
        "--decoder-embed-dim", "16", "--decoder-hidden-size", "16", "--decoder-out-embed-dim", "16",
        "--decoder-layers", "2", "--tokens-per-sample", "10", "--batch-size", "4", *flags])


def test_a_stock_lstm_lm_with_the_stateful_mixin_trains_under_stateful_lm(lm_data, tmp_path):
    args = stateful_lm_args(lm_data, "test_carrying_lstm_lm", "--optimizer", "sgd", "--lr", "1",
                            "--max-update", "3", "--save-dir", str(tmp_path), "--no-save",
                            "--disable-validation", "--no-progress-bar")
    train.main(convert_namespace_to_omegaconf(args))
    task = StatefulLMTask.setup_task(StatefulLMConfig(data=str(lm_data)))
    model = task.build_model(args)
    model.train()
    tokens = torch.randint(4, len(task.dictionary), (4, 10))
    model(tokens, stream_start=True)
    assert set(model.decoder.carried_state) == {"train"}  # the state was carried


def test_a_decoder_without_the_mixin_is_refused_in_one_line(lm_data):
    args = stateful_lm_args(lm_data, "lstm_lm")
    task = StatefulLMTask.setup_task(StatefulLMConfig(data=str(lm_data)))
    with pytest.raises(RShareConfigError, match="carries an LSTM's state between batches: use --arch rshare_lstm_lm"):
        task.build_model(args)


def test_every_plugin_architecture_is_declared_with_a_stock_parent():
    """Each arch the plugin registers, the named presets included, has a stock parent."""
    plugin_archs = {arch for arch, model in ARCH_MODEL_REGISTRY.items()
                    if model.__module__.startswith("fairseq_rshare.")}
    assert plugin_archs == set(DECLARATIONS)
    assert all(declaration.parent in ARCH_MODEL_REGISTRY for declaration in DECLARATIONS.values())


def tiny(family, side):
    sizes = {"embed-dim": 16, "layers": 1, **({"hidden-size": 16} if family == "lstm" else
                                               {"ffn-embed-dim": 16, "attention-heads": 2})}
    return [str(x) for name, value in sizes.items() for x in (f"--{side}-{name}", value)]


def built(arch, data):
    """A tiny model of `arch` over `data`, as fairseq-train builds it."""
    family = "lstm" if "lstm" in arch else "transformer"
    lm = "_lm" in arch
    flags = tiny(family, "decoder") + ([] if lm else tiny(family, "encoder"))
    if family == "lstm":
        flags += ["--decoder-out-embed-dim", "16"]
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [
        str(data), "--user-dir", USER_DIR, "--task", "language_modeling" if lm else "translation",
        "--arch", arch, *(["--tokens-per-sample", "16"] if lm else []), *flags])
    return tasks.setup_task(args).build_model(args)


@pytest.mark.parametrize("arch", sorted(DECLARATIONS))
def test_the_declared_output_key_is_the_parents_output_layer(arch, lm_data, nmt_data):
    """Parameter counting finds the output layer where the declaration says: in the stock parent
    (a dense V x H layer) and in the rshare model (the random-shared one)."""
    declaration = DECLARATIONS[arch]
    data = lm_data if declaration.parent.endswith("_lm") else nmt_data
    parent = built(declaration.parent, data)
    assert len(parent.state_dict()[declaration.output_key + ".weight"]) == len(parent.decoder.dictionary)
    assert count_by_component(parent, declaration.parent)["output"] == sum(
        p.numel() for name, p in parent.named_parameters() if name.startswith(declaration.output_key + "."))
    model = built(arch, data)
    inputs = {id(p) for p in model.decoder.embed_tokens.parameters()}  # a tied table counts as input
    assert count_by_component(model, arch)["output"] == sum(
        p.numel() for p in model.decoder.output_projection.parameters() if id(p) not in inputs) > 0


@pytest.mark.parametrize("optimizer", [
    lambda groups: torch.optim.SGD(groups, lr=0.5, momentum=0.9, weight_decay=0.01),
    lambda groups: torch.optim.Adam(groups, lr=0.01),
])
def test_pool_lr_scale_trains_the_pools_at_that_multiple_of_the_learning_rate(optimizer):
    """Three updates through a task's optimizer_step with --pool-lr-scale 0.3 equal three with
    torch's own parameter groups, the pools at 0.3 x the learning rate and every other weight at it."""
    scaled, grouped = tiny_lm().train(), tiny_lm().train()
    task = FairseqTask(None)
    scale_pool_steps(task, scaled, argparse.Namespace(pool_lr_scale=0.3))
    pools = {id(pool) for pool in pools_of(grouped)}
    assert pools
    optimizers = [
        optimizer(list(scaled.parameters())),
        optimizer([{"params": [p for p in grouped.parameters() if id(p) not in pools]}]),
    ]
    base_lr = optimizers[1].param_groups[0]["lr"]
    optimizers[1].add_param_group({"params": pools_of(grouped), "lr": 0.3 * base_lr})
    for update in range(3):
        tokens = torch.randint(4, 64, (2, 12))
        for model, opt in zip((scaled, grouped), optimizers):
            opt.zero_grad()
            logits, _ = model(tokens[:, :-1], stream_start=True)
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        task.optimizer_step(optimizers[0], scaled, update)
        optimizers[1].step()
    for (name, got), want in zip(scaled.named_parameters(), grouped.parameters()):
        assert torch.allclose(got, want, atol=1e-6), name
    unscaled = tiny_lm()
    assert not torch.allclose(pools_of(unscaled)[0], pools_of(scaled)[0], atol=1e-3)  # the pools did move


def test_pool_lr_scale_must_be_positive():
    with pytest.raises(RShareConfigError, match="--pool-lr-scale 0.0: give a number > 0"):
        tiny_lm(pool_lr_scale=0.0)


def translation_trainer(data, scale):
    """A fairseq Trainer of a tiny rshare_transformer under --task translation, and its first batch."""
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [
        str(data), "--user-dir", USER_DIR, "--cpu", "--task", "translation", "--arch", "rshare_transformer",
        *tiny("transformer", "encoder"), *tiny("transformer", "decoder"), "--dropout", "0",
        "--optimizer", "sgd", "--lr", "0.5", "--max-tokens", "500", "--pool-lr-scale", str(scale)])
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(0)
    model = task.build_model(cfg.model)
    trainer = Trainer(cfg, task, model, task.build_criterion(cfg.criterion))
    task.load_dataset("train")
    batches = task.get_batch_iterator(task.dataset("train"), max_tokens=500).next_epoch_itr(shuffle=False)
    return trainer, model, next(batches)


def test_pool_lr_scale_works_under_translation(nmt_data):
    """One fairseq training step of an rshare_transformer under --task translation: with
    --pool-lr-scale 3 the pools move 3 times as far as without it, every other weight the same."""
    steps = {}
    for scale in (1, 3):
        trainer, model, batch = translation_trainer(nmt_data, scale)
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        trainer.train_step([batch])
        steps[scale] = {name: p.detach() - before[name] for name, p in model.named_parameters()}
    pools = [name for name in steps[1] if name.endswith(".pool")]
    assert pools and steps[1][pools[0]].abs().sum() > 0
    for name, plain in steps[1].items():
        torch.testing.assert_close(steps[3][name], 3 * plain if name in pools else plain, rtol=1e-4, atol=1e-7)


def test_a_stateful_lm_checkpoint_that_recorded_pool_lr_scale_in_its_task_still_loads(lm_data):
    """Earlier releases kept --pool-lr-scale in the stateful_lm task's options."""
    from omegaconf import OmegaConf

    from fairseq_rshare.cli.export import checkpoint_task

    task_cfg = OmegaConf.create({"_name": "stateful_lm", "data": str(lm_data), "tokens_per_sample": 35,
                                 "batch_size": 4, "batch_size_valid": 4, "max_target_positions": 35,
                                 "pool_lr_scale": 2.0})
    assert isinstance(checkpoint_task({"cfg": {"task": task_cfg}}), StatefulLMTask)
