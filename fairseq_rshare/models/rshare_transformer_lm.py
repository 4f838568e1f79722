"""rshare_transformer_lm: fairseq's transformer LM with random-shared input and output tables."""
from dataclasses import dataclass

from fairseq.models import register_model
from fairseq.models.transformer import DEFAULT_MAX_TARGET_POSITIONS
from fairseq.models.transformer_lm import (
    TransformerLanguageModel,
    TransformerLanguageModelConfig,
)

from ..errors import RShareConfigError
from .pool_lr_scale import PoolLRScaleConfig, scale_pool_steps
from .declarations import declare_architecture
from .rshare_decoders import RShareTransformerDecoder
from .rshare_config import (
    RShareConfig,
    build_rshare_embedding,
    build_rshare_output,
    reject_parent_flags,
    rshare_tables,
)


@dataclass
class RShareTransformerLanguageModelConfig(TransformerLanguageModelConfig, RShareConfig, PoolLRScaleConfig):
    pass


# A model registered with a dataclass gets an architecture of its own name, with the
# dataclass defaults (those of fairseq's transformer_lm plus the --rshare-* flags).
@register_model("rshare_transformer_lm", dataclass=RShareTransformerLanguageModelConfig)
class RShareTransformerLanguageModel(TransformerLanguageModel):
    @classmethod
    def build_model(cls, args, task):
        if args.character_embeddings or args.adaptive_input or args.adaptive_softmax_cutoff:
            raise RShareConfigError(
                "rshare_transformer_lm replaces the embeddings and softmax: drop "
                "--character-embeddings, --adaptive-input and --adaptive-softmax-cutoff"
            )
        reject_parent_flags(args, "rshare_transformer_lm", ["decoder_layers_to_keep"])
        if getattr(args, "max_target_positions", None) is None:
            args.max_target_positions = getattr(
                args, "tokens_per_sample", DEFAULT_MAX_TARGET_POSITIONS
            )
        tables = rshare_tables(args, ("decoder-input", "decoder-output"))
        if "decoder-input" in tables:
            embed_tokens = build_rshare_embedding(
                args, task.source_dictionary, args.decoder_input_dim, "decoder-input"
            )
        else:
            embed_tokens = cls.build_embedding(args, task.source_dictionary, args.decoder_input_dim)
        output = build_rshare_output(
            args, task.target_dictionary, args.decoder_output_dim, tables, embed_tokens
        )
        decoder = RShareTransformerDecoder(
            args,
            task.target_dictionary,
            embed_tokens,
            no_encoder_attn=True,
            output_projection=output,
        )
        model = cls(decoder)
        scale_pool_steps(task, model, args)
        return model


declare_architecture("rshare_transformer_lm", parent="transformer_lm", output_key="decoder.output_projection")
