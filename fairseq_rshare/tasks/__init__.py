"""fairseq tasks registered by the plugin."""
from . import stateful_lm  # noqa: F401
