"""rshare_transformer: fairseq's transformer NMT model with random-shared embeddings and output layer."""
from fairseq.models import register_model
from fairseq.models.transformer import (
    DEFAULT_MAX_SOURCE_POSITIONS,
    DEFAULT_MAX_TARGET_POSITIONS,
    TransformerModel,
    base_architecture,
    transformer_iwslt_de_en,
)

from ..errors import RShareConfigError
from .pool_lr_scale import add_pool_lr_scale_arg, scale_pool_steps
from .declarations import register_rshare_architecture
from .rshare_decoders import RShareTransformerDecoder
from .rshare_config import (
    add_rshare_args,
    build_rshare_embedding,
    build_rshare_output,
    check_share_all_embeddings,
    dense_embed_path,
    rshare_tables,
    set_rshare_defaults,
)


@register_model("rshare_transformer")
class RShareTransformerModel(TransformerModel):
    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        add_rshare_args(parser)
        add_pool_lr_scale_arg(parser)

    @classmethod
    def build_model(cls, args, task):
        rshare_transformer_architecture(args)
        if args.adaptive_softmax_cutoff or args.encoder_layers_to_keep or args.decoder_layers_to_keep:
            raise RShareConfigError(
                "rshare_transformer does not support --adaptive-softmax-cutoff or "
                "--encoder/decoder-layers-to-keep: drop them"
            )
        if getattr(args, "max_source_positions", None) is None:
            args.max_source_positions = DEFAULT_MAX_SOURCE_POSITIONS
        if getattr(args, "max_target_positions", None) is None:
            args.max_target_positions = DEFAULT_MAX_TARGET_POSITIONS
        tables = rshare_tables(args, ("encoder-input", "decoder-input", "decoder-output"))
        src_dict, tgt_dict = task.source_dictionary, task.target_dictionary

        def build_embedding(dictionary, embed_dim, table):
            path = dense_embed_path(args, tables, table)
            if table in tables:
                return build_rshare_embedding(args, dictionary, embed_dim, table)
            return cls.build_embedding(args, dictionary, embed_dim, path)

        encoder_embed = build_embedding(src_dict, args.encoder_embed_dim, "encoder-input")
        if check_share_all_embeddings(args, tables, src_dict, tgt_dict):
            args.share_decoder_input_output_embed = True  # one table for all three
            decoder_embed = encoder_embed
        else:
            decoder_embed = build_embedding(tgt_dict, args.decoder_embed_dim, "decoder-input")
        output = build_rshare_output(
            args, tgt_dict, args.decoder_output_dim, tables, decoder_embed
        )
        encoder = cls.build_encoder(args, src_dict, encoder_embed)
        decoder = RShareTransformerDecoder(
            args,
            tgt_dict,
            decoder_embed,
            no_encoder_attn=args.no_cross_attention,
            output_projection=output,
        )
        model = cls(args, encoder, decoder)
        scale_pool_steps(task, model, args)
        return model


@register_rshare_architecture("rshare_transformer", "rshare_transformer",
                              parent="transformer", output_key="decoder.output_projection")
def rshare_transformer_architecture(args):
    set_rshare_defaults(args)
    base_architecture(args)


@register_rshare_architecture("rshare_transformer", "rshare_transformer_iwslt_de_en",
                              parent="transformer_iwslt_de_en", output_key="decoder.output_projection")
def rshare_transformer_iwslt_de_en(args):
    set_rshare_defaults(args)
    transformer_iwslt_de_en(args)
