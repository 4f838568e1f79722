"""The random-shared tables of an rshare model, built from the --rshare-* flags."""
import logging
import re

import torch

from ..errors import RShareConfigError
from ..mapping import pool_size_of_ratio
from ..modules import RandomSharedEmbedding, RandomSharedOutput
from ..modules.random_shared_embedding import TableSpec

logger = logging.getLogger(__name__)

# The modules' arguments, as their errors name them, and the flags that set them.
FLAG_OF_ARGUMENT = {
    "num_subvectors": "--rshare-subvectors", "pool_size": "--rshare-pool-size",
    "pool_kind": "--rshare-pool-kind", "private_words": "--rshare-frequent-words",
    "word_scale": "--rshare-word-scale", "use path": "use --rshare-output-path",
}

# Each table gets its own mapping: seed + offset (tied tables use the input table's).
SEED_OFFSETS = {"encoder-input": 0, "decoder-input": 1, "decoder-output": 2}


def rshare_tables(args, model_tables):
    """The set of tables to random-share, checked against those the model has."""
    spec = str(args.rshare_tables).strip()
    if spec == "all":
        chosen = set(model_tables)
    elif spec == "none":
        chosen = set()
    else:
        chosen = {name.strip() for name in spec.split(",") if name.strip()}
        unknown = chosen - set(model_tables)
        if unknown or not chosen:
            raise RShareConfigError(
                f"--rshare-tables {spec!r}: this model's tables are {', '.join(model_tables)} "
                "(comma-separated), or use all / none"
            )
    if args.rshare_input_ratio is not None and not chosen - {"decoder-output"}:
        raise RShareConfigError("--rshare-input-ratio is set but no input table is random-shared (see --rshare-tables)")
    if args.rshare_output_ratio is not None and "decoder-output" not in chosen:
        raise RShareConfigError("--rshare-output-ratio is set but decoder-output is not random-shared (see --rshare-tables)")
    return chosen


def size_setting(args, table):
    """The flag that sets the pool size of `table`, and its value: --rshare-pool-size, else
    --rshare-input-ratio or --rshare-output-ratio when given, else --rshare-ratio."""
    output = table == "decoder-output"
    flag = "--rshare-output-ratio" if output else "--rshare-input-ratio"
    ratio = args.rshare_output_ratio if output else args.rshare_input_ratio
    if ratio is not None and args.rshare_pool_size is not None:
        raise RShareConfigError(f"{flag} and --rshare-pool-size both set the size of {table}: use one")
    if args.rshare_pool_size is not None:
        return "--rshare-pool-size", args.rshare_pool_size
    if ratio is None:
        return "--rshare-ratio", args.rshare_ratio
    return flag, ratio


def pool_size_of_setting(flag, value, num_words, num_subvectors):
    """M from size_setting's flag and value: the pool size itself, or the ratio times V*K."""
    if flag == "--rshare-pool-size":
        return value
    if not 0 < value < 1:
        raise RShareConfigError(f"{flag} must be between 0 and 1 (exclusive), got {value}")
    return pool_size_of_ratio(num_words, num_subvectors, value)  # K itself is checked by the table


def warn_of_a_moved_ratio(flag, ratio, num_words, num_subvectors, pool_size, table):
    """One warning line when the pool's ratio is not the one asked (by more than 1 %)."""
    obtained = pool_size / (num_words * num_subvectors)
    if abs(obtained - ratio) > 0.01 * ratio:
        logger.warning(
            f"fairseq_rshare: {flag} {ratio} gives {table} a ratio of {obtained:.3g}, not {ratio}: "
            f"{ratio} x {num_words} words is {ratio * num_words:.3g} entries per position, and a pool "
            f"has a whole number of them, at least 2 (one would give every word the same vector), "
            f"so {pool_size // num_subvectors} per position, a pool of {pool_size}"
        )


def in_flag_words(error, **flags):
    """A module's error with the arguments it names replaced by the flags that set them
    (`flags`: argument -> words, over FLAG_OF_ARGUMENT)."""
    words = {**FLAG_OF_ARGUMENT, **flags}
    pattern = r"(?<![\w-])(" + "|".join(map(re.escape, words)) + r")(?![\w-])"
    return RShareConfigError(re.sub(pattern, lambda match: words[match.group(1)], str(error)))


def most_frequent_words(dictionary, count):
    """Ids of the `count` most frequent words by the dictionary's counts (ties by id), never a
    special symbol: a --srcdict or an external vocabulary need not be sorted by frequency."""
    if count < 0:
        raise RShareConfigError(f"--rshare-frequent-words must be 0 or more, got {count}")
    if count == 0:
        return []
    words = range(dictionary.nspecial, len(dictionary))
    if count > len(words):
        raise RShareConfigError(
            f"--rshare-frequent-words {count} is more than the {len(words)} words of the dictionary"
        )
    return sorted(words, key=lambda word: (-dictionary.count[word], word))[:count]


def check_same_on_all_ranks(fingerprint):
    """In distributed training every rank must regenerate the same table."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    fingerprints = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(fingerprints, fingerprint)
    if len(set(fingerprints)) > 1:
        raise RShareConfigError(
            f"the ranks built different rshare mappings ({', '.join(fingerprints)}): start "
            "every rank with the same --rshare-* flags and the same dictionary"
        )


def build_rshare_embedding(args, dictionary, embed_dim, table):
    if sum(dictionary.count[dictionary.nspecial:]) == 0:
        raise RShareConfigError(
            f"the {table} dictionary has no word seen in the data, only fairseq's special "
            "symbols: was the training data empty? Run fairseq-preprocess on a non-empty --trainpref"
        )
    V, K = len(dictionary), args.rshare_subvectors
    flag, value = size_setting(args, table)
    pool_size = pool_size_of_setting(flag, value, V, K)
    if args.rshare_init_std is not None and not args.rshare_init_std > 0:
        raise RShareConfigError(f"--rshare-init-std must be above 0, got {args.rshare_init_std}")
    private_words = most_frequent_words(dictionary, args.rshare_frequent_words)
    mapping_kind = str(args.rshare_mapping)
    if private_words and mapping_kind != "random":
        raise RShareConfigError(
            f"--rshare-frequent-words gives words private entries of the random mapping, but "
            f"--rshare-mapping {mapping_kind} learns every word's entries: drop one of them"
        )
    spec = TableSpec(
        num_words=V, embed_dim=embed_dim, num_subvectors=K, pool_size=pool_size,
        pool_kind=str(args.rshare_pool_kind), mapping_kind=mapping_kind,
        seed=args.rshare_seed + SEED_OFFSETS[table], private_words=tuple(private_words),
        word_scale=args.rshare_word_scale, init_std=args.rshare_init_std,
    )
    from_ratio = flag != "--rshare-pool-size"
    try:
        embedding = RandomSharedEmbedding.from_spec(spec, padding_idx=dictionary.pad())
    except RShareConfigError as error:
        pool_size_words = {"pool_size": f"{flag} {value}, a pool of"} if from_ratio else {}
        raise in_flag_words(error, **pool_size_words, **{"a larger pool": f"a larger {flag}"}) from None
    if from_ratio:
        warn_of_a_moved_ratio(flag, value, V, K, pool_size, table)
    # A checkpoint of another table is refused naming these, the flags (the module's own seed
    # is --rshare-seed plus the table's offset).
    embedding.settings = (
        f"{V} words, --rshare-subvectors {K}, {flag} {value} (a pool of {pool_size}), "
        f"--rshare-pool-kind {args.rshare_pool_kind}, --rshare-seed {args.rshare_seed}, "
        f"--rshare-frequent-words {args.rshare_frequent_words}, --rshare-mapping {mapping_kind}"
    )
    embedding.mapping_setting = f"--rshare-mapping {mapping_kind}"
    check_same_on_all_ranks(embedding.fingerprint)
    return embedding


def build_rshare_output(args, dictionary, output_dim, tables, decoder_embed):
    """The decoder's random-shared output layer, or None when it stays dense."""
    tied = bool(getattr(args, "share_decoder_input_output_embed", False))
    if tied:
        check_tied(tables, "decoder-input", "decoder-output", "--share-decoder-input-output-embed")
    if "decoder-output" not in tables:
        return None
    if tied:
        if args.rshare_output_ratio is not None:
            raise RShareConfigError(
                "--rshare-output-ratio sizes an untied output table, but --share-decoder-input-output-embed "
                "(or --share-all-embeddings) makes the output reuse the input table: drop one of them"
            )
        if decoder_embed.embedding_dim != output_dim:
            raise RShareConfigError(
                f"--share-decoder-input-output-embed needs the decoder input dim "
                f"({decoder_embed.embedding_dim}) to equal its output dim ({output_dim})"
            )
        table = decoder_embed
    else:
        table = build_rshare_embedding(args, dictionary, output_dim, "decoder-output")
    try:
        return RandomSharedOutput(table, bias=args.rshare_output_bias, path=str(args.rshare_output_path))
    except RShareConfigError as error:
        raise in_flag_words(error) from None


def check_tied(tables, first, second, flag):
    """Two tied tables must both be random-shared or both dense."""
    if (first in tables) != (second in tables):
        raise RShareConfigError(
            f"{flag} ties {first} and {second}, but --rshare-tables random-shares only "
            f"{first if first in tables else second}: list both tables or neither"
        )
