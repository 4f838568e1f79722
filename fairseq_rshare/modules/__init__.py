"""The random-shared embedding and output layer: plain modules, built from typed arguments."""
from .output_path import path_costs, pool_scores_is_cheaper
from .random_shared_embedding import RandomSharedEmbedding
from .random_shared_output import RandomSharedOutput

__all__ = ["RandomSharedEmbedding", "RandomSharedOutput", "path_costs", "pool_scores_is_cheaper"]
