"""The command-line side: fairseq-rshare-demo, fairseq-rshare-export, fairseq-rshare-compress,
and one-line errors in every command-line run of a fairseq tool with the plugin.

Importing the plugin changes nothing process-wide in a library user's program; only when the
running program is a command-line tool (fairseq-train, python -m fairseq_cli.train, the
plugin's own commands) does it show a bad setting or an unreadable checkpoint as one line
naming the fix, instead of a traceback through fairseq.
"""
import os
import sys
import warnings

from .. import checkpoints, precision
from ..errors import RShareConfigError
from ..tasks import empty_splits


def running_a_command_line_tool(program=None):
    program = os.path.abspath(program if program is not None else sys.argv[0])
    return (
        os.path.basename(program).startswith("fairseq-")
        or f"{os.sep}fairseq_cli{os.sep}" in program
        or f"{os.sep}fairseq_rshare{os.sep}cli{os.sep}" in program
    )


_previous_excepthook = sys.__excepthook__


def print_config_errors(exc_type, exc, tb):
    """Show an RShareConfigError as one line naming the fix, not a traceback through fairseq."""
    if issubclass(exc_type, RShareConfigError):
        print(f"fairseq_rshare: error: {exc}", file=sys.stderr)
        return
    _previous_excepthook(exc_type, exc, tb)


def quiet_hydra_deprecations():
    """fairseq 0.12 calls Hydra APIs that Hydra has since deprecated; the ~25 lines of warnings
    about that in every command would bury the one-line errors.  Only those are silenced, also
    under python -W or PYTHONWARNINGS (where ``-W error`` would otherwise stop fairseq itself);
    every other warning follows the options the user gave."""
    warnings.filterwarnings("ignore", category=UserWarning, module=r"hydra\.")
    warnings.filterwarnings("ignore", message=r"\s*'config' is validated against ConfigStore schema")


def install_error_handling():
    global _previous_excepthook
    if sys.excepthook is not print_config_errors:
        _previous_excepthook, sys.excepthook = sys.excepthook, print_config_errors
    checkpoints.install()
    empty_splits.install()
    precision.install()
    quiet_hydra_deprecations()
