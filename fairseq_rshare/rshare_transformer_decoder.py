"""The transformer decoder used by both rshare transformer architectures."""
from fairseq.models.transformer import TransformerDecoder

from .modules import SkipRenormalizationMixin


class RShareTransformerDecoder(SkipRenormalizationMixin, TransformerDecoder):
    """fairseq's TransformerDecoder; with a RandomSharedOutput as its output_projection, training
    skips the redundant log-softmax (see SkipRenormalizationMixin)."""
