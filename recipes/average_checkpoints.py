"""Average the model weights of a run's last N epoch checkpoints into one checkpoint, as fairseq
users do before evaluating a translation model (fairseq's scripts/average_checkpoints.py is not
shipped in its wheel).

Floating-point tensors are averaged; every other tensor (the rshare mapping fingerprint and
version) must be equal in all the checkpoints and is kept as it is.  The rest of the checkpoint
(configuration, training state) is the newest one's.
"""
import argparse
import glob
import os
import re
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from fairseq_rshare.checkpoints import unreadable_checkpoint_reason  # noqa: E402


def fail(message):
    sys.exit(f"average_checkpoints: error: {message}")


def last_epoch_checkpoints(folder, count):
    found = {}
    for path in glob.glob(os.path.join(folder, "checkpoint*.pt")):
        match = re.fullmatch(r"checkpoint(\d+)\.pt", os.path.basename(path))
        if match:
            found[int(match.group(1))] = path
    if len(found) < count:
        fail(f"{folder} has {len(found)} epoch checkpoints (checkpointN.pt), {count} asked: "
             "train with --keep-last-epochs N and without --no-epoch-checkpoints")
    return [found[epoch] for epoch in sorted(found)[-count:]]


def load(path):
    """The checkpoint as fairseq saved it (plain containers, loadable with weights_only)."""
    try:
        return torch.load(path, map_location="cpu")
    except Exception as error:  # noqa: BLE001 - any unreadable file ends in one line
        fail(f"cannot read {path}: {unreadable_checkpoint_reason(error) or error}")


def average(paths):
    states = [load(path) for path in paths]
    models = [state["model"] for state in states]
    averaged = {}
    for key, newest in models[-1].items():
        values = [model[key] for model in models]
        if newest.is_floating_point():
            averaged[key] = sum(value.double() for value in values).div(len(values)).to(newest.dtype)
        elif all(torch.equal(value, newest) for value in values):
            averaged[key] = newest
        else:
            fail(f"{key} differs between the checkpoints: were they trained with the same settings?")
    result = states[-1]
    result["model"] = averaged
    result["averaged_checkpoints"] = [os.path.basename(path) for path in paths]
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder", help="a fairseq-train --save-dir")
    parser.add_argument("--last", type=int, required=True, help="how many of the newest epoch checkpoints")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    if args.last < 1:
        fail(f"--last must be at least 1, got {args.last}")
    paths = last_epoch_checkpoints(args.folder, args.last)
    torch.save(average(paths), args.output + ".partial")
    os.replace(args.output + ".partial", args.output)
    print(f"averaged {', '.join(os.path.basename(p) for p in paths)} -> {args.output}")


if __name__ == "__main__":
    main()
