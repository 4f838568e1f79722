"""rshare_lstm_lm: fairseq's LSTM language model with random-shared input and output tables."""
from fairseq.models import register_model, register_model_architecture
from fairseq.models.lstm import LSTMDecoder
from fairseq.models.lstm_lm import DEFAULT_MAX_TARGET_POSITIONS, LSTMLanguageModel
from fairseq.models.lstm_lm import base_architecture as lstm_lm_base_architecture

from .modules import SkipRenormalizationMixin
from .options import (
    add_rshare_args,
    build_rshare_embedding,
    build_rshare_output,
    reject_adaptive_softmax,
    rshare_tables,
    set_rshare_defaults,
)


class RShareLSTMDecoder(SkipRenormalizationMixin, LSTMDecoder):
    """LSTMDecoder whose output layer may be given (a RandomSharedOutput) instead of built dense."""

    def __init__(self, output_projection=None, share_input_output_embed=False, **kwargs):
        # With a given output layer, share_input_output_embed=True only stops the parent from
        # allocating a dense V x H fc_out that would never be used.
        super().__init__(
            share_input_output_embed=share_input_output_embed or output_projection is not None,
            **kwargs,
        )
        self.output_projection = output_projection

    def forward(self, prev_output_tokens, encoder_out=None, incremental_state=None, src_lengths=None,
                features_only=False):
        """LSTMDecoder.forward, plus features_only (as fairseq's transformer decoder has it)."""
        if features_only:
            return self.extract_features(prev_output_tokens, encoder_out, incremental_state)
        return super().forward(prev_output_tokens, encoder_out, incremental_state, src_lengths)

    def output_layer(self, x):
        if self.output_projection is None:
            return super().output_layer(x)
        return self.output_projection(x)


def build_rshare_lstm_decoder(args, dictionary, encoder_output_units, attention, tables, embed):
    """An RShareLSTMDecoder over `dictionary`; `embed` is the decoder input table or None (dense)."""
    output = build_rshare_output(args, dictionary, args.decoder_out_embed_dim, tables, embed)
    return RShareLSTMDecoder(
        dictionary=dictionary,
        embed_dim=args.decoder_embed_dim,
        hidden_size=args.decoder_hidden_size,
        out_embed_dim=args.decoder_out_embed_dim,
        num_layers=args.decoder_layers,
        dropout_in=args.decoder_dropout_in,
        dropout_out=args.decoder_dropout_out,
        attention=attention,
        encoder_output_units=encoder_output_units,
        pretrained_embed=embed,
        share_input_output_embed=args.share_decoder_input_output_embed,
        output_projection=output,
        max_target_positions=args.max_target_positions,
        residuals=getattr(args, "residuals", False),
    )


@register_model("rshare_lstm_lm")
class RShareLSTMLanguageModel(LSTMLanguageModel):
    @staticmethod
    def add_args(parser):
        LSTMLanguageModel.add_args(parser)
        add_rshare_args(parser)

    @classmethod
    def build_model(cls, args, task):
        rshare_lstm_lm_architecture(args)
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
        return cls(decoder)


@register_model_architecture("rshare_lstm_lm", "rshare_lstm_lm")
def rshare_lstm_lm_architecture(args):
    reject_adaptive_softmax(args)
    set_rshare_defaults(args)
    lstm_lm_base_architecture(args)


@register_model_architecture("rshare_lstm_lm", "rshare_lstm_lm_ptb_small")
def rshare_lstm_lm_ptb_small(args):
    """Zaremba et al. (2014) small PTB model: 2 layers of 200 units."""
    args.decoder_embed_dim = getattr(args, "decoder_embed_dim", 200)
    args.decoder_hidden_size = getattr(args, "decoder_hidden_size", 200)
    args.decoder_out_embed_dim = getattr(args, "decoder_out_embed_dim", 200)
    args.decoder_layers = getattr(args, "decoder_layers", 2)
    args.dropout = getattr(args, "dropout", 0.0)
    rshare_lstm_lm_architecture(args)
