"""The rshare_cross_entropy and rshare_distill criteria."""
from . import rshare_cross_entropy, rshare_distill  # noqa: F401
