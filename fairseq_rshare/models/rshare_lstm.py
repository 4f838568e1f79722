"""rshare_lstm: fairseq's LSTM encoder-decoder with random-shared embeddings and output layer."""
from fairseq import utils
from fairseq.models import register_model
from fairseq.models.lstm import (
    DEFAULT_MAX_SOURCE_POSITIONS,
    DEFAULT_MAX_TARGET_POSITIONS,
    LSTMEncoder,
    LSTMModel,
)
from fairseq.models.lstm import base_architecture as lstm_base_architecture

from ..errors import RShareConfigError
from .rshare_config import (
    add_rshare_args,
    build_rshare_embedding,
    check_share_all_embeddings,
    reject_adaptive_softmax,
    reject_parent_flags,
    rshare_tables,
    set_rshare_defaults,
)
from .pool_lr_scale import add_pool_lr_scale_arg, scale_pool_steps
from .declarations import register_rshare_architecture
from .rshare_decoders import build_rshare_lstm_decoder


@register_model("rshare_lstm")
class RShareLSTMModel(LSTMModel):
    @staticmethod
    def add_args(parser):
        LSTMModel.add_args(parser)
        add_rshare_args(parser)
        add_pool_lr_scale_arg(parser)

    @classmethod
    def build_model(cls, args, task):
        rshare_lstm_architecture(args)
        reject_parent_flags(args, "rshare_lstm", ["encoder_embed_path", "encoder_freeze_embed",
                                                  "decoder_embed_path", "decoder_freeze_embed"])
        if args.encoder_layers != args.decoder_layers:
            raise RShareConfigError("--encoder-layers must match --decoder-layers")
        args.max_source_positions = getattr(args, "max_source_positions", DEFAULT_MAX_SOURCE_POSITIONS)
        args.max_target_positions = getattr(args, "max_target_positions", DEFAULT_MAX_TARGET_POSITIONS)
        tables = rshare_tables(args, ("encoder-input", "decoder-input", "decoder-output"))
        src_dict, tgt_dict = task.source_dictionary, task.target_dictionary

        if check_share_all_embeddings(args, tables, src_dict, tgt_dict):
            args.share_decoder_input_output_embed = True  # one table for all three

        encoder_embed = decoder_embed = None
        if "encoder-input" in tables:
            encoder_embed = build_rshare_embedding(args, src_dict, args.encoder_embed_dim, "encoder-input")
        if args.share_all_embeddings:
            decoder_embed = encoder_embed
        elif "decoder-input" in tables:
            decoder_embed = build_rshare_embedding(args, tgt_dict, args.decoder_embed_dim, "decoder-input")

        encoder = LSTMEncoder(
            dictionary=src_dict,
            embed_dim=args.encoder_embed_dim,
            hidden_size=args.encoder_hidden_size,
            num_layers=args.encoder_layers,
            dropout_in=args.encoder_dropout_in,
            dropout_out=args.encoder_dropout_out,
            bidirectional=args.encoder_bidirectional,
            pretrained_embed=encoder_embed,
            max_source_positions=args.max_source_positions,
        )
        if args.share_all_embeddings and decoder_embed is None:
            decoder_embed = encoder.embed_tokens
        decoder = build_rshare_lstm_decoder(
            args,
            tgt_dict,
            encoder_output_units=encoder.output_units,
            attention=utils.eval_bool(args.decoder_attention),
            tables=tables,
            embed=decoder_embed,
        )
        model = cls(encoder, decoder)
        scale_pool_steps(task, model, args)
        return model

    def forward(self, src_tokens, src_lengths, prev_output_tokens, incremental_state=None, features_only=False):
        """LSTMModel.forward, plus features_only (for the rshare_cross_entropy criterion)."""
        encoder_out = self.encoder(src_tokens, src_lengths=src_lengths)
        return self.decoder(
            prev_output_tokens, encoder_out=encoder_out, incremental_state=incremental_state,
            features_only=features_only,
        )


@register_rshare_architecture("rshare_lstm", "rshare_lstm", parent="lstm", output_key="decoder.fc_out")
def rshare_lstm_architecture(args):
    reject_adaptive_softmax(args)
    args.adaptive_softmax_cutoff = None
    set_rshare_defaults(args)
    lstm_base_architecture(args)
