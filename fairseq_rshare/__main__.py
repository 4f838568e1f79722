"""`python -m fairseq_rshare --help` lists the --rshare-* flags.

Stock fairseq prints --help before it adds an architecture's own flags, so
`fairseq-train --arch rshare_lstm_lm --help` cannot show them.
"""
import argparse

from .models.declarations import DECLARATIONS
from .models.rshare_config import RShareConfig
from fairseq.dataclass.utils import gen_parser_from_dataclass


class ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default; `unset` for one that defaults to None."""

    def _get_help_string(self, action):
        if action.default is None:
            return f"{action.help} (default: unset)"
        return super()._get_help_string(action)


parser = argparse.ArgumentParser(
    prog="python -m fairseq_rshare",
    formatter_class=ShowDefaults,
    # Every architecture the plugin registers is declared (tests/test_architectures.py checks it).
    description=f"Flags that every rshare architecture adds to fairseq-train ({', '.join(DECLARATIONS)}).",
)
gen_parser_from_dataclass(parser, RShareConfig())
parser.parse_args()
parser.print_help()
