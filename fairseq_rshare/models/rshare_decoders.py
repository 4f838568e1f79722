"""The rshare decoders, and the mixins they are made of (each usable on a stock fairseq decoder)."""
import torch
from fairseq.models.lstm import LSTMDecoder
from fairseq.models.transformer import TransformerDecoder

from ..errors import RShareConfigError
from ..modules import RandomSharedOutput
from .rshare_config import build_rshare_output


class SkipRenormalizationMixin:
    """For fairseq decoders whose output layer may be a RandomSharedOutput.

    In training its outputs are already log-probabilities, so fairseq's own log-softmax over
    them (a full extra pass over V, forward and backward) is skipped.  In evaluation fairseq
    normalises as usual, since the sequence generator may rescale the outputs first (the
    materialize path returns raw logits there, so they are normalised once).
    """

    def get_normalized_probs(self, net_output, log_probs, sample=None):
        if self.training and log_probs and isinstance(self.output_projection, RandomSharedOutput):
            return net_output[0]
        return super().get_normalized_probs(net_output, log_probs, sample)


class StatefulLSTMDecoder:
    """For fairseq LSTMDecoders (put it before LSTMDecoder in the bases): carry the LSTM state
    from one batch to the next (truncated BPTT), as the ``stateful_lm`` task needs.

    Carrying is asked for by the data: the ``stateful_lm`` task's batches hold
    ``stream_start`` in their ``net_input`` (True on the first window of each stream, False
    after).  The state is kept apart for training and evaluation mode, detached from the
    graph, and started from zero at each stream start.
    """

    carries_state = True  # what the stateful_lm task looks for

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
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


class RShareLSTMDecoder(SkipRenormalizationMixin, StatefulLSTMDecoder, LSTMDecoder):
    """LSTMDecoder whose output layer may be given (a RandomSharedOutput) instead of built
    dense, and which can carry its state between batches (StatefulLSTMDecoder)."""

    def __init__(self, output_projection=None, share_input_output_embed=False, **kwargs):
        # With a given output layer, share_input_output_embed=True only stops the parent from
        # allocating a dense V x H fc_out that would never be used.
        super().__init__(
            share_input_output_embed=share_input_output_embed or output_projection is not None,
            **kwargs,
        )
        self.output_projection = output_projection

    def output_layer(self, x):
        # The LSTM's features arrive as a transposed (B x T x H) view.  Without autograd
        # (validation, eval-lm, generation), F.linear over such a view runs about 2x slower in
        # float32 and 13x slower in bfloat16 on the CPU than over a copy (torch 2.13).
        x = x.contiguous()
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


class RShareTransformerDecoder(SkipRenormalizationMixin, TransformerDecoder):
    """fairseq's TransformerDecoder; with a RandomSharedOutput as its output_projection, training
    skips the redundant log-softmax (see SkipRenormalizationMixin)."""
