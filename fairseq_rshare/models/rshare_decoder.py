"""What every rshare decoder adds to its fairseq parent."""
from fairseq.models.transformer import TransformerDecoder

from ..modules import RandomSharedOutput


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


class RShareTransformerDecoder(SkipRenormalizationMixin, TransformerDecoder):
    """fairseq's TransformerDecoder; with a RandomSharedOutput as its output_projection, training
    skips the redundant log-softmax (see SkipRenormalizationMixin)."""
