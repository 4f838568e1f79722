"""stateful_lm: language modelling the way published LSTM LM results are measured.

fairseq's ``language_modeling`` task starts every sample from a zero state.  Here, as in
Zaremba et al. (2014) and fairseq's ``examples/truncated_bptt``, the token stream of a split
(every line followed by its end-of-line symbol) is cut into B parallel streams (``--batch-size``
per rank); batch i holds the next ``--tokens-per-sample`` tokens of every stream, so its rows
continue batch i-1's rows, and the LSTM decoder carries its state from batch to batch
(truncated backpropagation through time).  The state starts from zero at the first window of
each pass over a split: every epoch, every validation, every ``fairseq-eval-lm`` run, and after
a resume (the window order resumes where it stopped, the state from zero).

Every token is predicted exactly once: the stream is preceded by one end-of-line symbol as
context, and the last row is padded at its end (padded targets are not scored).
"""
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq import utils
from fairseq.data import Dictionary, FairseqDataset, data_utils, iterators
from fairseq.dataclass import FairseqDataclass
from fairseq.distributed import utils as distributed_utils
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II

from ..errors import RShareConfigError
from .empty_splits import check_split_not_empty


@dataclass
class StatefulLMConfig(FairseqDataclass):
    data: Optional[str] = field(default=None, metadata={"help": "folder of fairseq-preprocess --only-source output"})
    tokens_per_sample: int = field(
        default=35, metadata={"help": "window length: tokens of each stream per batch (the BPTT length)"}
    )
    batch_size: Optional[int] = II("dataset.batch_size")
    batch_size_valid: Optional[int] = II("dataset.batch_size_valid")
    max_target_positions: Optional[int] = II("task.tokens_per_sample")


class StreamWindows(FairseqDataset):
    """Window i of this rank's streams: (sources, targets), each streams x <= window tokens."""

    def __init__(self, tokens, pad, eos, streams, window, rank=0, ranks=1):
        """``tokens``: the split as one 1-D stream; ``streams`` rows per rank."""
        rows = streams * ranks
        length = math.ceil(len(tokens) / rows)
        padded = torch.full((rows * length + 1,), pad, dtype=torch.long)
        padded[0] = eos
        padded[1 : len(tokens) + 1] = tokens
        mine = slice(rank * streams, (rank + 1) * streams)
        self.sources = padded[:-1].view(rows, length)[mine]
        self.targets = padded[1:].view(rows, length)[mine]
        self.window, self.pad = window, pad

    def __len__(self):
        return math.ceil(self.sources.shape[1] / self.window)

    def __getitem__(self, i):
        columns = slice(i * self.window, (i + 1) * self.window)
        return i, self.sources[:, columns].contiguous(), self.targets[:, columns].contiguous()

    def collate(self, items):
        """A fairseq sample of one window; fairseq's batching is not used (one item a batch)."""
        [(i, sources, targets)] = items
        streams, length = sources.shape
        return {
            "id": torch.full((streams,), i, dtype=torch.long),
            "net_input": {
                "src_tokens": sources,
                "src_lengths": torch.full((streams,), length, dtype=torch.long),
                "stream_start": i == 0,
            },
            "target": targets,
            "nsentences": streams,
            "ntokens": int(targets.ne(self.pad).sum()),
        }


@register_task("stateful_lm", dataclass=StatefulLMConfig)
class StatefulLMTask(FairseqTask):
    def __init__(self, cfg, dictionary):
        super().__init__(cfg)
        self.dictionary = dictionary

    @classmethod
    def setup_task(cls, cfg, **kwargs):
        if not cfg.data:
            raise RShareConfigError("--task stateful_lm needs the data folder (fairseq-preprocess --only-source output)")
        dictionary = Dictionary.load(os.path.join(utils.split_paths(cfg.data)[0], "dict.txt"))
        return cls(cfg, dictionary)

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        if not getattr(getattr(model, "decoder", None), "carries_state", False):
            raise RShareConfigError(
                "--task stateful_lm carries an LSTM's state between batches: use --arch "
                "rshare_lstm_lm or rshare_lstm_lm_ptb_small (--rshare-tables none for a dense model), "
                "a model whose decoder is a StatefulLSTMDecoder (fairseq_rshare.models.rshare_decoders), "
                "or --task language_modeling for other models"
            )
        return model

    def streams_for(self, split):
        streams = self.cfg.batch_size if split == "train" else self.cfg.batch_size_valid or self.cfg.batch_size
        if not streams or streams < 1:
            raise RShareConfigError(
                "--task stateful_lm needs --batch-size B (B parallel streams per rank; "
                "--batch-size-valid for validation)"
            )
        return streams

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        paths = utils.split_paths(self.cfg.data)
        path = os.path.join(paths[(epoch - 1) % len(paths)], split)
        check_split_not_empty(path)
        lines = data_utils.load_indexed_dataset(path, self.dictionary, combine=combine)
        if lines is None or len(lines) == 0:
            raise RShareConfigError(f"no {split} data at {path}: run fairseq-preprocess with --{split}pref")
        rank, ranks = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank = distributed_utils.get_data_parallel_rank()
            ranks = distributed_utils.get_data_parallel_world_size()
        tokens = torch.cat([lines[i] for i in range(len(lines))])
        self.datasets[split] = StreamWindows(
            tokens, self.dictionary.pad(), self.dictionary.eos(), self.streams_for(split),
            self.cfg.tokens_per_sample, rank, ranks,
        )

    def get_batch_iterator(self, dataset, epoch=1, num_workers=0, data_buffer_size=0,
                           skip_remainder_batch=False, disable_iterator_cache=False, **unused):
        """Windows in order, one a batch; the dataset is already this rank's streams.  One
        iterator per dataset, reused as fairseq's own tasks do (each new one would start, and
        keep, its own data-loading worker processes)."""
        if dataset in self.dataset_to_epoch_iter and not disable_iterator_cache:
            return self.dataset_to_epoch_iter[dataset]
        self.dataset_to_epoch_iter[dataset] = iterators.EpochBatchIterator(
            dataset=dataset,
            collate_fn=dataset.collate,
            batch_sampler=[[i] for i in range(len(dataset))],
            num_workers=num_workers,
            epoch=epoch,
            buffer_size=data_buffer_size,
            disable_shuffling=True,
            skip_remainder_batch=skip_remainder_batch,
        )
        return self.dataset_to_epoch_iter[dataset]

    def eval_lm_dataloader(self, dataset, context_window=0, num_workers=1, data_buffer_size=10, **unused):
        if context_window:
            raise RShareConfigError("--task stateful_lm carries the state over the whole test stream: drop --context-window")
        return self.get_batch_iterator(
            dataset, num_workers=num_workers, data_buffer_size=data_buffer_size
        ).next_epoch_itr(shuffle=False)

    @property
    def source_dictionary(self):
        return self.dictionary

    @property
    def target_dictionary(self):
        return self.dictionary
