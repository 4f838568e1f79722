"""`python -m fairseq_rshare --help` lists the --rshare-* flags.

Stock fairseq prints --help before it adds an architecture's own flags, so
`fairseq-train --arch rshare_lstm_lm --help` cannot show them.
"""
import argparse

from .models.rshare_config import RShareConfig
from fairseq.dataclass.utils import gen_parser_from_dataclass

parser = argparse.ArgumentParser(
    prog="python -m fairseq_rshare",
    description="Flags that every rshare architecture adds to fairseq-train "
    "(rshare_lstm_lm, rshare_lstm_lm_ptb_small, rshare_lstm_lm_ptb_slim, rshare_lstm_lm_ptb_tied, "
    "rshare_lstm, rshare_transformer_lm, "
    "rshare_transformer, rshare_transformer_iwslt_de_en).",
)
gen_parser_from_dataclass(parser, RShareConfig())
parser.parse_args()
parser.print_help()
