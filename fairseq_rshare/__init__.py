"""fairseq_rshare: random parameter sharing for fairseq embeddings and softmax layers.

Use with ``fairseq-train --user-dir fairseq_rshare --arch rshare_lstm_lm ...`` or ``import
fairseq_rshare`` (after ``pip install``): importing registers the architectures, criterion
and task, and in a command-line run only, turns their errors into one line (see cli/).
"""
from .errors import RShareConfigError
from .modules import RandomSharedEmbedding, RandomSharedOutput
from .checkpoints import RShareCheckpointError
from . import cli, criterions, models, tasks  # noqa: F401

if cli.running_a_command_line_tool():
    cli.install_error_handling()

__all__ = ["RandomSharedEmbedding", "RandomSharedOutput", "RShareConfigError", "RShareCheckpointError"]
