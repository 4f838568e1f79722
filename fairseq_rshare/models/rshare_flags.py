"""The --rshare-* flags, shared by every rshare architecture; their choices are the modules' own."""
from dataclasses import dataclass, field
from typing import Optional

from fairseq.dataclass import ChoiceEnum, FairseqDataclass

from ..mapping import MAPPING_KINDS, POOL_LAYOUTS
from ..modules.output_path import OUTPUT_PATHS


@dataclass
class RShareConfig(FairseqDataclass):
    rshare_subvectors: int = field(
        default=8, metadata={"help": "K: sub-vectors per word vector (must divide the embed dim)"}
    )
    rshare_pool_size: Optional[int] = field(
        default=None,
        metadata={"help": "M: pool entries per table, K*(entries per position); overrides --rshare-ratio"},
    )
    rshare_ratio: float = field(
        default=0.1,
        metadata={"help": "table size as a fraction of the dense V x H table: M = ratio*V*K, rounded to a multiple of K"},
    )
    rshare_input_ratio: Optional[float] = field(
        default=None,
        metadata={"help": "--rshare-ratio of the input tables only (encoder-input, decoder-input)"},
    )
    rshare_output_ratio: Optional[float] = field(
        default=None,
        metadata={"help": "--rshare-ratio of an untied decoder-output table only"},
    )
    rshare_pool_kind: ChoiceEnum(list(POOL_LAYOUTS)) = field(
        default="position",
        metadata={"help": "position: slot k draws only from its own M/K entries (fast output layer); global: any entry anywhere (the paper's single pool)"},
    )
    rshare_mapping: ChoiceEnum(list(MAPPING_KINDS)) = field(
        default="random",
        metadata={"help": "random: the fixed random mapping regenerated from --rshare-seed (the paper's); kmeans, kmeans-balanced: learned from a trained dense table by fairseq-rshare-compress and stored in its checkpoint (only loading one can give it)"},
    )
    rshare_seed: int = field(
        default=1, metadata={"help": "seed of the fixed random mapping (not the training seed)"}
    )
    rshare_tables: str = field(
        default="all",
        metadata={"help": "comma-separated tables to random-share, from encoder-input, decoder-input, decoder-output; or all, or none (a dense baseline)"},
    )
    rshare_frequent_words: int = field(
        default=0,
        metadata={"help": "frequency-aware variant (not the paper's; 0 = off): the F most frequent words by the dictionary's counts get private sub-vectors, the rest share the remainder of the same pool"},
    )
    rshare_output_path: ChoiceEnum(list(OUTPUT_PATHS)) = field(
        default="auto",
        metadata={"help": "how the random-shared output layer computes: pool-scores (never builds the V x H matrix), materialize (builds it once a batch, as dense), or auto (on CPU both are timed at the first training step, and on the first two evaluation calls, one path each, and the faster of each kept; a cost model of the shape before that and on other devices)"},
    )
    rshare_output_bias: bool = field(
        default=False, metadata={"help": "add a per-word bias to the random-shared output layer"}
    )
    rshare_word_scale: bool = field(
        default=False,
        metadata={"help": "give every word a trained scale on each of its K sub-vectors (V*K more parameters, the importance weights of hash embeddings; not the paper's)"},
    )
    rshare_init_std: Optional[float] = field(
        default=None,
        metadata={"help": "standard deviation of the pool's normal initialisation (unset: H**-0.5, as fairseq's embeddings)"},
    )
