"""rshare_cross_entropy: fairseq's label-smoothed cross-entropy without its tokens x V log-probabilities."""
import logging

import torch.nn.functional as F
from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
    label_smoothed_nll_loss,
)

from ..kernels import cross_entropy_of_logits
from ..models.rshare_decoders import SkipRenormalizationMixin
from ..modules import RandomSharedOutput

logger = logging.getLogger(__name__)


@register_criterion("rshare_cross_entropy", dataclass=LabelSmoothedCrossEntropyCriterionConfig)
class RShareCrossEntropyCriterion(LabelSmoothedCrossEntropyCriterion):
    """``label_smoothed_cross_entropy`` (``--label-smoothing`` 0 by default: plain cross-entropy,
    perplexity reported from nll_loss) without fairseq's tokens x V float32 log-probabilities,
    the same values by one of three routes (each logged once):

    - an rshare output layer computes the loss from the decoder's features
      (``RandomSharedOutput.loss``): from the pool scores, or from the materialised matrix's
      logits;
    - a decoder of the rshare family with a dense output layer and no adaptive softmax (the
      dense baselines) gives logits, and the loss is taken from them
      (``cross_entropy_of_logits``);
    - otherwise (other models, ``--report-accuracy`` (an argmax over V), unreduced losses, and
      an rshare output layer whose ``auto`` has yet to time its evaluation paths, which it does
      on real batches of its forward) the parent's log-probabilities.
    """

    announced = frozenset()  # the routes the loss has taken, each logged once

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

    def route(self, model, reduce):
        """Where the loss comes from: "the pool scores", "the output layer's logits", "the
        logits" or "log-probabilities" (see the class docstring)."""
        decoder = getattr(model, "decoder", None)
        output = getattr(decoder, "output_projection", None)
        if self.report_accuracy or not reduce:
            return "log-probabilities"
        if isinstance(output, RandomSharedOutput):
            if output.path == "pool-scores":
                return "the pool scores"
            return "the output layer's logits" if output.path_settled() else "log-probabilities"
        if isinstance(decoder, SkipRenormalizationMixin) and getattr(decoder, "adaptive_softmax", None) is None:
            return "the logits"
        return "log-probabilities"

    def scored(self, outputs, target):
        """The (batch x time) outputs and targets that are scored: --ignore-prefix-size drops
        the first positions."""
        prefix = self.ignore_prefix_size
        return (outputs[:, prefix:], target[:, prefix:]) if prefix > 0 else (outputs, target)

    def forward(self, model, sample, reduce=True):
        output = getattr(getattr(model, "decoder", None), "output_projection", None)
        if isinstance(output, RandomSharedOutput):
            output.measure_path_once(sample["ntokens"])
        route = self.route(model, reduce)
        if route not in self.announced:
            self.announced = self.announced | {route}
            logger.info(f"rshare_cross_entropy: loss from {route}")
        if route == "log-probabilities":
            return super().forward(model, sample, reduce)
        if route == "the logits":
            net_output = model(**sample["net_input"])
            logits, target = self.scored(net_output[0], model.get_targets(sample, net_output))
            loss, nll_loss = cross_entropy_of_logits(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                     self.eps, ignore_index=self.padding_idx)
        else:
            features, _ = model(**sample["net_input"], features_only=True)
            features, target = self.scored(features, model.get_targets(sample, None))
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
