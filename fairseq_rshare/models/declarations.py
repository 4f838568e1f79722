"""What each rshare architecture declares, in one place: the stock fairseq architecture it
exports to (its parent), and the state-dict key of that parent's output layer.

fairseq-rshare-export, `python -m fairseq_rshare --help` and checkpoints.parameters_by_component
read these declarations; tests/test_architectures.py checks that every registered rshare
architecture has one.
"""
from dataclasses import dataclass

from fairseq.models import register_model_architecture

RSHARE_OUTPUT_KEY = "decoder.output_projection"  # where every rshare model keeps a random-shared output layer


@dataclass(frozen=True)
class Declaration:
    parent: str  # the stock architecture the export writes
    output_key: str  # the parent's output layer in its state dict (also the rshare model's dense one)


DECLARATIONS = {}  # rshare arch name -> Declaration


def declare_architecture(arch, parent, output_key):
    """Declare an arch that fairseq registers by other means (a model registered with a dataclass)."""
    DECLARATIONS[arch] = Declaration(parent, output_key)


def register_rshare_architecture(model, arch, parent, output_key):
    """fairseq's register_model_architecture, with the arch's declaration."""
    declare_architecture(arch, parent, output_key)
    return register_model_architecture(model, arch)


def output_keys(arch):
    """The state-dict keys an output layer of a model of `arch` (an rshare arch or a declared
    parent) can have, or None for an arch nobody declared."""
    if arch in DECLARATIONS:
        return {RSHARE_OUTPUT_KEY, DECLARATIONS[arch].output_key}
    keys = {d.output_key for d in DECLARATIONS.values() if d.parent == arch}
    return keys or None
