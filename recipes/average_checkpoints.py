"""Average the model weights of a run's last N epoch checkpoints into one checkpoint, as fairseq
users do before evaluating a translation model (fairseq's scripts/average_checkpoints.py is not
shipped in its wheel).

Floating-point tensors are averaged; every other tensor (the rshare mapping fingerprint and
version) must be equal in all the checkpoints and is kept as it is.  The rest of the checkpoint
(configuration, training state) is the newest one's, without the optimizer state.  As fairseq's
script does, the checkpoints are read one at a time into a running sum of the weights, so memory
holds the sum and one checkpoint, whatever N.
"""
import argparse
import glob
import os
import re
import sys

import torch

from fairseq_rshare.checkpoints import FAIRSEQ_GLOBALS, unreadable_checkpoint_reason


def fail(message):
    sys.exit(f"average_checkpoints: error: {message}")


def last_epoch_checkpoints(folder, count):
    found = {}
    for path in glob.glob(os.path.join(glob.escape(folder), "checkpoint*.pt")):
        match = re.fullmatch(r"checkpoint(\d+)\.pt", os.path.basename(path))
        if match:
            found[int(match.group(1))] = path
    if len(found) < count:
        fail(f"{folder} has {len(found)} epoch checkpoints (checkpointN.pt), {count} asked: "
             "train with --keep-last-epochs N and without --no-epoch-checkpoints")
    return [found[epoch] for epoch in sorted(found)[-count:]]


def load(path):
    """The checkpoint as fairseq saved it (plain containers, loadable with weights_only), its
    optimizer state (often twice the model) dropped at once."""
    try:
        with torch.serialization.safe_globals(FAIRSEQ_GLOBALS):
            state = torch.load(path, map_location="cpu")
    except Exception as error:  # noqa: BLE001 - any unreadable file ends in one line
        fail(f"cannot read {path}: {unreadable_checkpoint_reason(error) or error}")
    state.pop("last_optimizer_state", None)
    return state


def add(sums, dtypes, model, path, first):
    """Add model (read from path) into sums: float64 running sums of the floating-point tensors
    (their dtypes kept in dtypes), the other tensors as the first checkpoint has them."""
    if not sums:
        for key, value in model.items():
            if value.is_floating_point():
                dtypes[key] = value.dtype
                value = value.double()
            sums[key] = value
        return
    if model.keys() != sums.keys():
        key = next(key for key in [*sums, *model] if key not in sums or key not in model)
        fail(f"{first} and {path} hold different weights (first differing key: {key}): "
             "average checkpoints of one run")
    for key, value in model.items():
        if value.shape != sums[key].shape:
            fail(f"{key} has shape {list(sums[key].shape)} in {first} but {list(value.shape)} in {path}: "
                 "average checkpoints of one run")
        if key in dtypes:
            sums[key] += value
        elif not torch.equal(value, sums[key]):
            fail(f"{key} differs between {first} and {path}: were they trained with the same settings?")


def average(paths):
    sums, dtypes = {}, {}
    for path in paths:
        newest = load(path)
        add(sums, dtypes, newest.pop("model"), path, paths[0])
    newest["model"] = {key: (value / len(paths)).to(dtypes[key]) if key in dtypes else value
                       for key, value in sums.items()}
    newest["averaged_checkpoints"] = [os.path.basename(path) for path in paths]
    return newest


def save(state, output):
    """Write output through a temporary file renamed into place, creating its folder if needed."""
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    partial = f"{output}.{os.getpid()}.partial"
    try:
        torch.save(state, partial)
        os.replace(partial, output)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder", help="a fairseq-train --save-dir")
    parser.add_argument("--last", type=int, required=True, help="how many of the newest epoch checkpoints")
    parser.add_argument("--output", required=True, help="the averaged checkpoint (its folder is created if needed)")
    args = parser.parse_args(argv)
    if args.last < 1:
        fail(f"--last must be at least 1, got {args.last}")
    paths = last_epoch_checkpoints(args.folder, args.last)
    if os.path.realpath(args.output) in map(os.path.realpath, paths):
        fail(f"--output {args.output} is one of the checkpoints averaged: give another file name")
    state = average(paths)
    try:
        save(state, args.output)
    except (OSError, RuntimeError) as error:  # torch.save's own failures are RuntimeErrors
        fail(f"cannot write {args.output}: {error}")
    print(f"averaged {', '.join(os.path.basename(p) for p in paths)} -> {args.output}")


if __name__ == "__main__":
    main()
