"""rshare_distill: word-level knowledge distillation from a frozen teacher (Hinton et al., 2015;
Kim and Rush, 2016), mixed with rshare_cross_entropy's loss."""
import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from fairseq import checkpoint_utils, utils
from fairseq.criterions import register_criterion
from fairseq.logging import metrics

from ..checkpoints import FAIRSEQ_GLOBALS
from ..errors import RShareConfigError
from ..tasks.stateful_lm import StatefulLMTask
from .rshare_cross_entropy import LabelSmoothedCrossEntropyCriterionConfig, RShareCrossEntropyCriterion

logger = logging.getLogger(__name__)


@dataclass
class RShareDistillConfig(LabelSmoothedCrossEntropyCriterionConfig):
    teacher_path: Optional[str] = field(
        default=None, metadata={"help": "fairseq checkpoint of the teacher, trained on the same dictionary"}
    )
    distill_weight: float = field(
        default=0.5, metadata={"help": "w: the loss is (1 - w) x cross-entropy + w x T^2 x KL(teacher || student)"}
    )
    distill_temperature: float = field(
        default=1.0, metadata={"help": "T: both distributions are softmax(logits / T) in the KL term"}
    )


def distillation_kl(student_lprobs, teacher_lprobs, temperature):
    """sum over tokens (rows) of KL(softmax(teacher / T) || softmax(student / T)), from the
    models' log-probabilities.  At T = 1 those are the distributions; otherwise softmax(lprobs / T)
    equals softmax(logits / T), since a shift of a row does not change its softmax."""
    teacher_lprobs = teacher_lprobs.to(student_lprobs.dtype)
    if temperature != 1:
        student_lprobs = F.log_softmax(student_lprobs / temperature, dim=-1)
        teacher_lprobs = F.log_softmax(teacher_lprobs / temperature, dim=-1)
    return F.kl_div(student_lprobs, teacher_lprobs, reduction="sum", log_target=True)


def load_teacher(path, task):
    """The teacher model of checkpoint `path`, in eval mode and frozen, built over the student's
    dictionaries (its task reads them from the student's data folder)."""
    if not path:
        raise RShareConfigError("--criterion rshare_distill needs --teacher-path, a fairseq checkpoint of the teacher")
    if not os.path.isfile(path):
        raise RShareConfigError(f"--teacher-path {path}: no such file; give a fairseq checkpoint of the teacher")
    data = getattr(task.cfg, "data", None)
    words = len(task.target_dictionary)

    def another_dictionary(reason):
        return RShareConfigError(
            f"--teacher-path {path}: the teacher was trained with another dictionary than the student's "
            f"{words} words ({reason}): give a teacher trained on the same fairseq-preprocess output"
        )

    try:
        with torch.serialization.safe_globals(FAIRSEQ_GLOBALS):  # a fairseq 0.12 checkpoint's cfg
            [teacher], _ = checkpoint_utils.load_model_ensemble([path], arg_overrides={"data": data} if data else None)
    except RuntimeError as error:
        found = re.search(r"size mismatch for [^\n]*", str(error))
        if found is None:
            raise
        raise another_dictionary(found.group(0).rstrip(".")) from error
    except RShareConfigError as error:
        # With the student's dictionary and the teacher's own settings, only another vocabulary
        # size regenerates another mapping.
        if "mapping fingerprint" in str(error):
            raise another_dictionary(f"V={words} regenerates another rshare mapping") from error
        raise RShareConfigError(f"--teacher-path {path}: {error}") from error
    if isinstance(task, StatefulLMTask) and not getattr(getattr(teacher, "decoder", None), "carries_state", False):
        raise RShareConfigError(
            f"--teacher-path {path}: --task stateful_lm carries the LSTM state between batches, which this "
            "teacher cannot: give one trained with --arch rshare_lstm_lm (--rshare-tables none for a dense model)"
        )
    return teacher.eval().requires_grad_(False)


@register_criterion("rshare_distill", dataclass=RShareDistillConfig)
class RShareDistillCriterion(RShareCrossEntropyCriterion):
    """In training steps, over the tokens whose target is not padding:

        loss = (1 - w) * CE + w * T^2 * sum_tokens sum_v p(v) * (log p(v) - log q(v))
        p = softmax(teacher_logits / T),  q = softmax(student_logits / T)

    CE is rshare_cross_entropy's loss (label-smoothed with ``--label-smoothing``), summed over
    tokens like the KL term; sample_size is fairseq's (ntokens, or sentences with
    ``--sentence-avg``).  T^2 keeps the KL term's gradient on the scale of CE's as T changes.
    ``nll_loss`` (and so ppl) is the student's plain NLL; ``distill_kl`` is the KL term without
    w * T^2, in bits per token.  Validation steps (and unreduced losses, never asked for in
    training) are rshare_cross_entropy alone, so validation perplexity compares with it and
    the teacher never sees validation batches; so does w = 0, without running the teacher.

    The teacher gets the student's net_input (stream_start included: under ``stateful_lm``
    it carries its own LSTM state, kept under "eval" since it stays in eval mode), runs
    without gradients on the student's device, and is held in a tuple: not a submodule, so
    fairseq's Trainer neither optimises nor saves it with the criterion.
    """

    def __init__(self, task, sentence_avg, label_smoothing, teacher_path, distill_weight, distill_temperature,
                 ignore_prefix_size=0, report_accuracy=False):
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy)
        if not 0 <= distill_weight <= 1:
            raise RShareConfigError(
                f"--distill-weight {distill_weight}: give a number in [0, 1] (0: cross-entropy alone, 1: KL alone)"
            )
        if not distill_temperature > 0:
            raise RShareConfigError(
                f"--distill-temperature {distill_temperature}: give a number > 0 (1: the models' own distributions)"
            )
        self.distill_weight, self.distill_temperature = distill_weight, distill_temperature
        self.frozen_teacher = (load_teacher(teacher_path, task),)
        logger.info(
            f"rshare_distill: teacher {teacher_path} ({type(self.teacher).__name__}, "
            f"{sum(p.numel() for p in self.teacher.parameters()):,} parameters), "
            f"weight {distill_weight}, temperature {distill_temperature}"
        )

    @property
    def teacher(self):
        return self.frozen_teacher[0]

    def forward(self, model, sample, reduce=True):
        if not (model.training and self.distill_weight and reduce):
            return super().forward(model, sample, reduce)
        net_output = model(**sample["net_input"])
        student_lprobs, target = self.get_lprobs_and_target(model, net_output, sample)
        cross_entropy, nll_loss = self.loss_of_lprobs(student_lprobs, target)  # one tokens x V pass for both
        scored = target.ne(self.padding_idx)
        kl = distillation_kl(student_lprobs[scored], self.teacher_lprobs(model, sample)[scored],
                             self.distill_temperature)
        w, T = self.distill_weight, self.distill_temperature
        loss = (1 - w) * cross_entropy + w * T**2 * kl
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        logging_output = {
            "loss": loss.data,
            "nll_loss": nll_loss.data,
            "distill_kl": kl.data,
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
        }
        if self.report_accuracy:
            n_correct, total = self.compute_accuracy(model, net_output, sample)
            logging_output["n_correct"] = utils.item(n_correct.data)
            logging_output["total"] = utils.item(total.data)
        return loss, sample_size, logging_output

    def teacher_lprobs(self, model, sample):
        """The teacher's log-probabilities, flattened as the student's (tokens x V)."""
        device = next(model.parameters()).device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        with torch.no_grad():
            net_output = self.teacher(**sample["net_input"])
            lprobs, _ = self.get_lprobs_and_target(self.teacher, net_output, sample)
        return lprobs

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        if any("distill_kl" in log for log in logging_outputs):
            kl = sum(log.get("distill_kl", 0) for log in logging_outputs)
            ntokens = sum(log.get("ntokens", 0) for log in logging_outputs)
            metrics.log_scalar("distill_kl", kl / ntokens / math.log(2), ntokens, round=3)
