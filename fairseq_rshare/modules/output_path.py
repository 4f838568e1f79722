"""How the random-shared output layer chooses between its two paths (see RandomSharedOutput):
the cost model, and with path "auto" the timing of both paths, the same choice on every rank."""
import logging
import math
import time

import torch

from .. import kernels

logger = logging.getLogger(__name__)

OUTPUT_PATHS = ("auto", "pool-scores", "materialize")
TIMED_PATHS = ("pool-scores", "materialize")

# Timed steps of each path (after one warm-up) when `auto` measures them.
MEASURED_STEPS = 3

# What one pool score and one gathered word score cost, in multiply-adds of a dense matmul
# (forward + backward, loss included), fitted on 2 CPU cores to the fused kernels: at V=10k,
# H=200, K=8 pool-scores runs 2.7x faster than materialize with 200 entries per position and
# 1.6x slower with 2000 (the pool-scores matmul has an inner dimension of only H/K, and a
# large score table falls out of cache), as this predicts.
SCORE_COST = 7


# In evaluation `auto` times the two paths on real batches (not a slice: the pool-scores path's
# cost per token grows with the batch, whose score table and log-probabilities outgrow the
# caches), each on one call for at least this long or MEASURED_STEPS repeats of it.
EVALUATION_TIMED_SECONDS = 0.02

# `auto` times the two paths only where the cost model's estimates lie within this factor of
# each other; beyond it the model's choice stands untimed (timing materialize at V=800k,
# H=1024 would build a 3.3 GB matrix, its gradient and tokens x V log-probabilities).
TIMED_WITHIN = 4


def path_costs(num_words, embed_dim, num_subvectors, scores_per_token):
    """Cost model: (pool-scores, materialize) per token, in dense multiply-adds.  Pool scores
    cost (scores per token) * H/K multiply-adds plus V*K gathered scores, each about
    SCORE_COST dense multiply-adds; the materialised matrix costs V*H multiply-adds (building
    it is once a batch)."""
    V, H, K = num_words, embed_dim, num_subvectors
    return SCORE_COST * (scores_per_token * H / K + V * K), V * H


def pool_scores_is_cheaper(num_words, embed_dim, num_subvectors, scores_per_token, device=None, dtype=torch.float32):
    """Cost model: the pool-scores path beats multiplying by the materialised V x H matrix.
    Only where fused kernels run (on torch's default device unless told): elsewhere pool scores
    fall back to stock ops that build tokens x V x K gathered scores, so the materialised matrix
    wins."""
    pool_scores, materialize = path_costs(num_words, embed_dim, num_subvectors, scores_per_token)
    device = device if device is not None else torch.get_default_device()
    return pool_scores < materialize and kernels.supports(device, dtype)


def finished_on(device, work):
    """`work`, returning only once the device has done it: a GPU runs queued work after the
    call returns, and a wall-clock timer must see it done."""
    if torch.device(device).type != "cuda":
        return work

    def finished(*args):
        result = work(*args)
        torch.cuda.synchronize(device)
        return result

    return finished


class PathChooser:
    """The path of one output layer, by its setting ("auto", "pool-scores" or "materialize").

    With "auto" it picks by the cost model (:func:`pool_scores_is_cheaper`) until it has timed
    both paths, which it does once per regime ("training", "evaluation") and device type, where
    fused kernels run and the cost model is not clear by more than TIMED_WITHIN, and on a GPU
    (stock ops there, which the cost model does not describe) at every shape: training on
    steps the layer hands it (:meth:`time_training`), evaluation on the layer's first two real
    evaluation calls, one path each (:meth:`time_evaluation`).  In distributed runs every rank
    takes rank 0's choice, so all run the same code.  ``timer`` gives the time in seconds.
    """

    def __init__(self, setting, cost_shape, description, timer=time.perf_counter):
        self.setting = setting
        self.cost_shape = cost_shape  # (V, H, K, pool scores per token): path_costs' arguments
        self.description = description  # the layer, as the log line names it
        self.timer = timer
        self.chosen = {}  # (device type, regime) -> the path timed faster there
        self.evaluation_seconds = {}  # path -> seconds per token, timed on real evaluation calls

    def untimed_path(self, device, dtype):
        """The path on a device and dtype of pool scores before any timing."""
        if self.setting != "auto":
            return self.setting
        return "pool-scores" if pool_scores_is_cheaper(*self.cost_shape, device, dtype) else "materialize"

    def path(self, device, dtype, regime):
        """The path taken: the one timed faster for this regime on this device type, if any."""
        return self.chosen.get((torch.device(device).type, regime)) or self.untimed_path(device, dtype)

    def needs_timing(self, device, dtype, regime):
        """auto, not yet timed for this regime on this device type, and either fused kernels
        here with a cost model not clear, or a device where pool scores on stock ops have not
        been measured to lose (the cost model, fitted to the kernels, says nothing of them)."""
        device_type = torch.device(device).type
        if self.setting != "auto" or (device_type, regime) in self.chosen:
            return False
        if kernels.supports(device, dtype):
            costs = path_costs(*self.cost_shape)
            return max(costs) <= TIMED_WITHIN * min(costs)
        return not kernels.stock_pool_scores_lose(device)

    def time_training(self, device, step, num_tokens):
        """Choose the training path: `step(path)` runs forward and backward of the loss on
        `num_tokens` tokens through `path`."""
        seconds = {path: self.seconds_per_step(finished_on(device, step), path) for path in TIMED_PATHS}
        return self.take_faster(seconds, num_tokens, device, "training")

    def seconds_per_step(self, step, path):
        """Seconds per ``step(path)``, or infinity where the path runs out of device memory."""
        try:
            step(path)  # warm-up
            start = self.timer()
            for _ in range(MEASURED_STEPS):
                step(path)
        except torch.OutOfMemoryError:
            return math.inf
        return (self.timer() - start) / MEASURED_STEPS

    def time_evaluation(self, device, call, features, num_tokens):
        """The evaluation choice, made on real work: returns ``call(path, features)``, the first
        call through pool-scores, the second through materialize, each timed per token; after
        the second the faster is kept.  Only the difference between the paths on one batch is
        lost."""
        path = next(path for path in TIMED_PATHS if path not in self.evaluation_seconds)
        seconds, output = self.seconds_per_call(finished_on(device, call), path, features)
        self.evaluation_seconds[path] = seconds / num_tokens
        if len(self.evaluation_seconds) == len(TIMED_PATHS):
            per_thousand = {path: 1000 * seconds for path, seconds in self.evaluation_seconds.items()}
            self.take_faster(per_thousand, 1000, device, "evaluation")
        return output

    def seconds_per_call(self, call, path, features):
        """(seconds per call, output) of ``call(path, features)``, warmed up on one token; what
        is built once and kept across calls (the materialised matrix) is then not timed."""
        call(path, features.reshape(-1, features.shape[-1])[:1])
        calls, start = 0, self.timer()
        while True:
            output = call(path, features)
            calls += 1
            elapsed = self.timer() - start
            if elapsed >= EVALUATION_TIMED_SECONDS or calls == MEASURED_STEPS:
                return elapsed / calls, output

    def take_faster(self, seconds, num_tokens, device, regime):
        """Keep the faster path for `regime` on `device` (rank 0's in distributed runs), log
        both times and the choice, return it."""
        choice = min(seconds, key=seconds.get)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            shared = [choice]
            torch.distributed.broadcast_object_list(shared, src=0)
            choice = shared[0]
        self.chosen[torch.device(device).type, regime] = choice
        logger.info("%s, %d tokens, %s: pool-scores %.1f ms, materialize %.1f ms: taking %s", self.description,
                    num_tokens, regime, 1000 * seconds["pool-scores"], 1000 * seconds["materialize"], choice)
        return choice
