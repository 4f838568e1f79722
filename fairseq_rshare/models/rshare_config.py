"""What every rshare architecture shares: adding the --rshare-* flags, and the checks of the parent
architecture's flags against the random-shared tables.  The table builders are re-exported
from rshare_tables, the flags' schema from rshare_flags."""
from dataclasses import fields

from fairseq.dataclass.utils import gen_parser_from_dataclass

from ..errors import RShareConfigError
from .rshare_flags import RShareConfig
from .rshare_tables import build_rshare_embedding, build_rshare_output, check_tied, rshare_tables

__all__ = [
    "RShareConfig", "add_rshare_args", "build_rshare_embedding", "build_rshare_output",
    "check_share_all_embeddings", "dense_embed_path", "reject_adaptive_softmax",
    "reject_parent_flags", "rshare_tables", "set_rshare_defaults",
]


def add_rshare_args(parser):
    """Add the --rshare-* flags to an argparse-based model's parser (defaults come from the arch)."""
    gen_parser_from_dataclass(parser, RShareConfig(), delete_default=True)


def set_rshare_defaults(args):
    for option in fields(RShareConfig):
        if getattr(args, option.name, None) is None:
            setattr(args, option.name, option.default)


def check_share_all_embeddings(args, tables, src_dict, tgt_dict):
    """Whether --share-all-embeddings is set, checked against the dictionaries and tables (the
    caller then ties the decoder's input and output too)."""
    if not args.share_all_embeddings:
        return False
    if src_dict != tgt_dict or args.encoder_embed_dim != args.decoder_embed_dim:
        raise RShareConfigError(
            "--share-all-embeddings needs a joined dictionary and "
            "--encoder-embed-dim equal to --decoder-embed-dim"
        )
    check_tied(tables, "encoder-input", "decoder-input", "--share-all-embeddings")
    return True


def reject_parent_flags(args, arch, flags):
    """One line for a parent architecture's flag that this one does not carry out."""
    for dest in flags:
        if getattr(args, dest, None):
            flag = "--" + dest.replace("_", "-")
            raise RShareConfigError(f"{arch} does not support {flag}: drop it")


def dense_embed_path(args, tables, table):
    """--encoder/decoder-embed-path of a dense input table; an error for a random-shared one."""
    side = table.split("-")[0]
    path = getattr(args, f"{side}_embed_path", None)
    if path and table in tables:
        raise RShareConfigError(
            f"--{side}-embed-path loads a dense table, but {table} is random-shared: drop the "
            f"flag, or leave {table} out of --rshare-tables"
        )
    return path


def reject_adaptive_softmax(args):
    """The adaptive-softmax criterion has no rshare counterpart (the caller then clears the cutoff)."""
    if getattr(args, "criterion", None) == "adaptive_loss":
        raise RShareConfigError(
            "rshare architectures have no adaptive softmax: use --criterion cross_entropy "
            "(or rshare_cross_entropy, which never builds tokens x V log-probabilities)"
        )
