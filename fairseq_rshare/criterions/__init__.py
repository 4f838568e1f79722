"""The rshare_cross_entropy criterion."""
from . import rshare_cross_entropy  # noqa: F401
