"""How an architecture joins the plugin: decoders made of mixins, and one declaration per arch."""
import argparse

import pytest
import torch
from fairseq import options
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.models import register_model, register_model_architecture
from fairseq.models.lstm import LSTMDecoder
from fairseq.models.lstm_lm import LSTMLanguageModel
from fairseq.models.lstm_lm import base_architecture as lstm_lm_base_architecture
from fairseq_cli import train

import fairseq_rshare  # noqa: F401
from fairseq_rshare.errors import RShareConfigError
from fairseq_rshare.models.rshare_decoders import StatefulLSTMDecoder
from fairseq_rshare.tasks.stateful_lm import StatefulLMConfig, StatefulLMTask

from conftest import USER_DIR


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
