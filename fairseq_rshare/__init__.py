"""fairseq_rshare: random parameter sharing for fairseq embeddings and softmax layers.

Use with ``fairseq-train --user-dir fairseq_rshare --arch rshare_lstm_lm ...`` or ``import
fairseq_rshare`` (after ``pip install``): importing registers the architectures.
"""
import sys

from .modules import RandomSharedEmbedding, RandomSharedOutput, RShareConfigError
from .checkpoints import RShareCheckpointError
from . import rshare_cross_entropy, rshare_lstm, rshare_lstm_lm, rshare_transformer, rshare_transformer_lm, tasks  # noqa: F401


def _print_config_errors(exc_type, exc, tb, _previous_hook=sys.excepthook):
    """Show an RShareConfigError as one line naming the fix, not a traceback through fairseq."""
    if issubclass(exc_type, RShareConfigError):
        print(f"fairseq_rshare: error: {exc}", file=sys.stderr)
        return
    _previous_hook(exc_type, exc, tb)


sys.excepthook = _print_config_errors

__all__ = ["RandomSharedEmbedding", "RandomSharedOutput", "RShareConfigError", "RShareCheckpointError"]
