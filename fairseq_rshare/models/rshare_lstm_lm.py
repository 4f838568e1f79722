"""rshare_lstm_lm: fairseq's LSTM language model with random-shared input and output tables."""
import torch
from fairseq.models import register_model, register_model_architecture
from fairseq.models.lstm import LSTMDecoder
from fairseq.models.lstm_lm import DEFAULT_MAX_TARGET_POSITIONS, LSTMLanguageModel
from fairseq.models.lstm_lm import base_architecture as lstm_lm_base_architecture

from ..errors import RShareConfigError
from .rshare_decoder import SkipRenormalizationMixin
from .rshare_config import (
    add_rshare_args,
    build_rshare_embedding,
    build_rshare_output,
    reject_adaptive_softmax,
    reject_parent_flags,
    rshare_tables,
    set_rshare_defaults,
)


class RShareLSTMDecoder(SkipRenormalizationMixin, LSTMDecoder):
    """LSTMDecoder whose output layer may be given (a RandomSharedOutput) instead of built dense,
    and which can carry its LSTM state from one batch to the next (truncated BPTT).

    Carrying is asked for by the data: the ``stateful_lm`` task's batches hold
    ``stream_start`` in their ``net_input`` (True on the first window of each stream, False
    after).  The state is kept apart for training and evaluation mode, detached from the
    graph, and started from zero at each stream start.
    """

    def __init__(self, output_projection=None, share_input_output_embed=False, **kwargs):
        # With a given output layer, share_input_output_embed=True only stops the parent from
        # allocating a dense V x H fc_out that would never be used.
        super().__init__(
            share_input_output_embed=share_input_output_embed or output_projection is not None,
            **kwargs,
        )
        self.output_projection = output_projection
        self.carried_state = {}  # "train" / "eval" -> (hiddens, cells), each layers x B x H

    def forward(self, prev_output_tokens, encoder_out=None, incremental_state=None, src_lengths=None,
                features_only=False, stream_start=None):
        """LSTMDecoder.forward, plus features_only (as fairseq's transformer decoder has it) and
        stream_start (carry the state from the previous batch unless True)."""
        if stream_start is not None:
            x = self.extract_features_carrying_state(prev_output_tokens, stream_start)
            return x if features_only else (self.output_layer(x[0]), x[1])
        if features_only:
            return self.extract_features(prev_output_tokens, encoder_out, incremental_state)
        return super().forward(prev_output_tokens, encoder_out, incremental_state, src_lengths)

    def extract_features_carrying_state(self, tokens, stream_start):
        """The parent's extract_features with no encoder, but starting from the state the
        previous batch of the same mode left (zero at a stream start), run as one fused LSTM
        over the window instead of a Python loop of cells."""
        if self.residuals:
            raise RShareConfigError("--task stateful_lm does not support --residuals in the LSTM decoder")
        mode = "train" if self.training else "eval"
        x = self.dropout_in_module(self.embed_tokens(tokens)).transpose(0, 1)
        state = None if stream_start else self.carried_state.get(mode)
        if state is None or state[0].shape[1] != x.shape[1]:
            zeros = x.new_zeros(self.num_layers, x.shape[1], self.hidden_size)
            state = (zeros, zeros)
        weights = [w for cell in self.layers for w in (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)]
        # Between layers the parent applies dropout_out to each step's hidden state, as
        # torch.lstm's dropout does; then once more to the last layer's output.
        x, hiddens, cells = torch.lstm(
            x, state, weights, True, self.num_layers, self.dropout_out_module.p, self.training, False, False
        )
        self.carried_state[mode] = (hiddens.detach(), cells.detach())
        x = self.dropout_out_module(x).transpose(0, 1)
        if hasattr(self, "additional_fc") and self.adaptive_softmax is None:
            x = self.dropout_out_module(self.additional_fc(x))
        return x, None

    def output_layer(self, x):
        if self.output_projection is None:
            return super().output_layer(x)
        return self.output_projection(x)


def build_rshare_lstm_decoder(args, dictionary, encoder_output_units, attention, tables, embed):
    """An RShareLSTMDecoder over `dictionary`; `embed` is the decoder input table or None (dense)."""
    if args.share_decoder_input_output_embed and args.decoder_embed_dim != args.decoder_out_embed_dim:
        raise RShareConfigError(
            f"--share-decoder-input-output-embed needs --decoder-embed-dim ({args.decoder_embed_dim}) "
            f"equal to --decoder-out-embed-dim ({args.decoder_out_embed_dim})"
        )
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
        return cls(decoder)


@register_model_architecture("rshare_lstm_lm", "rshare_lstm_lm")
def rshare_lstm_lm_architecture(args):
    reject_adaptive_softmax(args)
    args.adaptive_softmax_cutoff = None
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


@register_model_architecture("rshare_lstm_lm", "rshare_lstm_lm_ptb_slim")
def rshare_lstm_lm_ptb_slim(args):
    """The best rshare PTB model measured at the small model's parameter count: 2 layers of 320
    units, dropout 0.3, both tables random-shared at 45 % of dense with an output bias
    (4.54 M parameters on PTB against dense 2x200's 4.66 M; recipes/README.md)."""
    for name in ("decoder_embed_dim", "decoder_hidden_size", "decoder_out_embed_dim"):
        setattr(args, name, getattr(args, name, 320))
    args.dropout = getattr(args, "dropout", 0.3)
    args.rshare_ratio = getattr(args, "rshare_ratio", 0.45)
    args.rshare_output_bias = getattr(args, "rshare_output_bias", True)
    rshare_lstm_lm_ptb_small(args)


@register_model_architecture("rshare_lstm_lm", "rshare_lstm_lm_ptb_tied")
def rshare_lstm_lm_ptb_tied(args):
    """The best rshare PTB model measured at 10 % of dense's embedding+softmax parameters: the
    small model (2x200) with one random-shared table at 15 % of a dense table serving the input
    and the output layer, a trained scale per word and sub-vector, and an output bias (390,272
    parameters against dense's 4,013,208; recipes/README.md). Tying is what the arch is (the
    parent's flag defaults to False, so an unset flag cannot be told from an explicit one); for
    untied tables use the small model."""
    args.share_decoder_input_output_embed = True
    args.rshare_ratio = getattr(args, "rshare_ratio", 0.15)
    args.rshare_word_scale = getattr(args, "rshare_word_scale", True)
    args.rshare_output_bias = getattr(args, "rshare_output_bias", True)
    rshare_lstm_lm_ptb_small(args)
