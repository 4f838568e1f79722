"""rshare_cross_entropy: fairseq's label-smoothed cross-entropy, computed from the pool scores."""
import logging

import torch.nn.functional as F
from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
    label_smoothed_nll_loss,
)

from ..modules import RandomSharedOutput

logger = logging.getLogger(__name__)


@register_criterion("rshare_cross_entropy", dataclass=LabelSmoothedCrossEntropyCriterionConfig)
class RShareCrossEntropyCriterion(LabelSmoothedCrossEntropyCriterion):
    """``label_smoothed_cross_entropy`` (``--label-smoothing`` 0 by default: plain cross-entropy,
    perplexity reported from nll_loss) that, for a model whose output layer takes the
    pool-scores path, asks the decoder for its features and lets the output layer compute the
    loss (``RandomSharedOutput.loss``): no tokens x V log-probabilities, forward or backward.
    Other models, ``--report-accuracy`` (an argmax over V) and unreduced losses take the
    parent's path, with the same values.
    """

    announced = frozenset()  # the paths the loss has taken, each logged once

    def compute_loss(self, model, net_output, sample, reduce=True):
        if not reduce:
            return super().compute_loss(model, net_output, sample, reduce)
        return self.loss_of_lprobs(*self.get_lprobs_and_target(model, net_output, sample))

    def loss_of_lprobs(self, lprobs, target):
        """(loss, nll_loss), each summed over the tokens, of flat tokens x V log-probabilities;
        without label smoothing, the NLL alone: the parent's smoothing term, weighted 0, would
        still cost a tokens x V pass forward and backward."""
        if self.eps:
            return label_smoothed_nll_loss(lprobs, target, self.eps, ignore_index=self.padding_idx, reduce=True)
        nll_loss = F.nll_loss(lprobs, target, ignore_index=self.padding_idx, reduction="sum")
        return nll_loss, nll_loss

    def forward(self, model, sample, reduce=True):
        output = getattr(getattr(model, "decoder", None), "output_projection", None)
        if isinstance(output, RandomSharedOutput):
            output.measure_path_once(sample["ntokens"])
        fused = isinstance(output, RandomSharedOutput) and output.path == "pool-scores"
        fused = fused and not self.report_accuracy and reduce
        if fused not in self.announced:
            self.announced = self.announced | {fused}
            logger.info(
                "rshare_cross_entropy: loss from the pool scores" if fused else
                "rshare_cross_entropy: loss from log-probabilities (no pool-scores output layer, "
                "--report-accuracy or an unreduced loss)"
            )
        if not fused:
            return super().forward(model, sample, reduce)
        features, _ = model(**sample["net_input"], features_only=True)
        target = model.get_targets(sample, None)
        if self.ignore_prefix_size > 0:
            features = features[:, self.ignore_prefix_size :]
            target = target[:, self.ignore_prefix_size :]
        loss, nll_loss = output.loss(features, target, self.eps, ignore_index=self.padding_idx)
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        logging_output = {
            "loss": loss.data,
            "nll_loss": nll_loss.data,
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
        }
        return loss, sample_size, logging_output
