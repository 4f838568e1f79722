"""rshare_lstm_lm: fairseq's LSTM language model with random-shared input and output tables."""
from fairseq.models import register_model
from fairseq.models.lstm_lm import DEFAULT_MAX_TARGET_POSITIONS, LSTMLanguageModel
from fairseq.models.lstm_lm import base_architecture as lstm_lm_base_architecture

from .pool_lr_scale import add_pool_lr_scale_arg, scale_pool_steps
from .declarations import register_rshare_architecture
from .rshare_decoders import build_rshare_lstm_decoder
from .rshare_config import (
    add_rshare_args,
    build_rshare_embedding,
    reject_adaptive_softmax,
    reject_parent_flags,
    rshare_tables,
    set_rshare_defaults,
)


LSTM_LM = dict(parent="lstm_lm", output_key="decoder.fc_out")  # every rshare_lstm_lm arch exports to lstm_lm

@register_model("rshare_lstm_lm")
class RShareLSTMLanguageModel(LSTMLanguageModel):
    @staticmethod
    def add_args(parser):
        LSTMLanguageModel.add_args(parser)
        add_rshare_args(parser)
        add_pool_lr_scale_arg(parser)

    @classmethod
    def build_model(cls, args, task):
        rshare_lstm_lm_architecture(args)
        reject_parent_flags(args, "rshare_lstm_lm", ["decoder_embed_path"])
        if getattr(args, "max_target_positions", None) is None:
            args.max_target_positions = getattr(
                args, "tokens_per_sample", DEFAULT_MAX_TARGET_POSITIONS
            )
        tables = rshare_tables(args, ("decoder-input", "decoder-output"))
        dictionary = task.target_dictionary
        embed = None
        if "decoder-input" in tables:
            embed = build_rshare_embedding(args, dictionary, args.decoder_embed_dim, "decoder-input")
        decoder = build_rshare_lstm_decoder(
            args, dictionary, encoder_output_units=0, attention=False, tables=tables, embed=embed
        )
        model = cls(decoder)
        scale_pool_steps(task, model, args)
        return model


@register_rshare_architecture("rshare_lstm_lm", "rshare_lstm_lm", **LSTM_LM)
def rshare_lstm_lm_architecture(args):
    reject_adaptive_softmax(args)
    args.adaptive_softmax_cutoff = None
    set_rshare_defaults(args)
    lstm_lm_base_architecture(args)


@register_rshare_architecture("rshare_lstm_lm", "rshare_lstm_lm_ptb_small", **LSTM_LM)
def rshare_lstm_lm_ptb_small(args):
    """Zaremba et al. (2014) small PTB model: 2 layers of 200 units."""
    args.decoder_embed_dim = getattr(args, "decoder_embed_dim", 200)
    args.decoder_hidden_size = getattr(args, "decoder_hidden_size", 200)
    args.decoder_out_embed_dim = getattr(args, "decoder_out_embed_dim", 200)
    args.decoder_layers = getattr(args, "decoder_layers", 2)
    args.dropout = getattr(args, "dropout", 0.0)
    rshare_lstm_lm_architecture(args)


@register_rshare_architecture("rshare_lstm_lm", "rshare_lstm_lm_ptb_slim", **LSTM_LM)
def rshare_lstm_lm_ptb_slim(args):
    """A PTB model under the small model's parameter count: 2 layers of 320 units, dropout 0.3,
    both tables random-shared at 45 % of dense with an output bias."""
    for name in ("decoder_embed_dim", "decoder_hidden_size", "decoder_out_embed_dim"):
        setattr(args, name, getattr(args, name, 320))
    args.dropout = getattr(args, "dropout", 0.3)
    args.rshare_ratio = getattr(args, "rshare_ratio", 0.45)
    args.rshare_output_bias = getattr(args, "rshare_output_bias", True)
    rshare_lstm_lm_ptb_small(args)


@register_rshare_architecture("rshare_lstm_lm", "rshare_lstm_lm_ptb_tied", **LSTM_LM)
def rshare_lstm_lm_ptb_tied(args):
    """The small model (2x200) at under 10 % of dense's embedding+softmax parameters: one
    random-shared table at 15 % of a dense table serving the input and the output layer, a
    trained scale per word and sub-vector, and an output bias. Tying is what the arch is (the
    parent's flag defaults to False, so an unset flag cannot be told from an explicit one); for
    untied tables use the small model."""
    args.share_decoder_input_output_embed = True
    args.rshare_ratio = getattr(args, "rshare_ratio", 0.15)
    args.rshare_word_scale = getattr(args, "rshare_word_scale", True)
    args.rshare_output_bias = getattr(args, "rshare_output_bias", True)
    rshare_lstm_lm_ptb_small(args)
