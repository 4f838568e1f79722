"""The largest table ratio at which an rshare run fits a dense run's parameter budget, on the
corpus at hand, so that same-budget pairs are chosen by rule and not per corpus by hand:

    python3 -m recipes.budget DATA-BIN --dense dense-tied-h200-drop0.3 \\
        --rshare rshare-R-bias-scale-tied-h320-drop0.3 -- --arch rshare_lstm_lm_ptb_small

prints the rshare run's name with R filled in (``rshare-0.284-bias-...`` on PTB) and both totals.
With ``--tables F`` the budget is F times the dense run's embedding+softmax parameters, and the
rshare run's embedding+softmax parameters must fit it (a compression target: ``--tables 0.1``,
tables at 10 % of the dense ones); with ``--input-tables F`` the same for the input tables alone
(the output layer left out of both counts: ``--input-tables 0.01``, the input table at 1 %).
Each run is built as lm.sh builds it (``--task stateful_lm``), or with ``--recipe translation``
as translation.sh does (``--task translation``, the language pair read from DATA-BIN), on
DATA-BIN's dictionary, with the preset's model flags (after ``--``) and the run name's flags.
Every parameter counts, a stored mapping as its bytes / 4. R is searched on a grid of 0.001: the
rshare count grows with R.
"""
import argparse
import functools
import glob
import os
import sys

from fairseq import options, tasks

import fairseq_rshare
from fairseq_rshare.checkpoints import count_by_component
from fairseq_rshare.errors import RShareConfigError
from recipes import variants

USER_DIR = os.path.dirname(os.path.abspath(fairseq_rshare.__file__))
GRID = 1000  # R in steps of 1 / GRID


def ratio_name(template, step):
    return template.replace("rshare-R", "rshare-" + f"{step / GRID:.3f}".rstrip("0"), 1)


TASKS = {"lm": "stateful_lm", "translation": "translation"}


def parameters(data_bin, model_flags, name, words, recipe="lm"):
    """The parameters of run `name` of `recipe` (lm or translation), built on `data_bin`'s
    dictionary, by component (input, output, body)."""
    arguments = [data_bin, "--user-dir", USER_DIR, "--task", TASKS[recipe], "--cpu", *model_flags,
                 *variants.flags(recipe, name, words).split()]
    args = options.parse_args_and_arch(options.get_training_parser(), arguments)
    model = tasks.setup_task(args).build_model(args)
    return count_by_component(model, args.arch)


def total_parameters(data_bin, model_flags, name, words, recipe="lm"):
    """All parameters of run `name` of `recipe`, built on `data_bin`'s dictionary."""
    return sum(parameters(data_bin, model_flags, name, words, recipe).values())


def table_parameters(data_bin, model_flags, name, words, recipe="lm"):
    """The embedding+softmax parameters of run `name` of `recipe`, built on `data_bin`'s dictionary."""
    counts = parameters(data_bin, model_flags, name, words, recipe)
    return counts["input"] + counts["output"]


def input_table_parameters(data_bin, model_flags, name, words, recipe="lm"):
    """The input-table parameters of run `name` of `recipe` (a table tied to the output counted
    once, as input), built on `data_bin`'s dictionary."""
    return parameters(data_bin, model_flags, name, words, recipe)["input"]


def largest_fitting_ratio(fits):
    """The largest step in 1..GRID-1 for which ``fits(step)`` holds, `fits` being monotone (true
    up to some step, false after), or None when even the first step does not fit."""
    low, high = 0, GRID  # fits(low) is taken as true, fits(high) as false
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low or None


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python3 -m recipes.budget", description=__doc__,
                                     usage="%(prog)s DATA-BIN --dense NAME --rshare NAME [-- MODEL FLAGS]",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_bin", metavar="DATA-BIN", help="the corpus as the recipe's prepare step binarised it")
    parser.add_argument("--recipe", choices=sorted(TASKS), default="lm", help="whose runs: lm.sh's or "
                        "translation.sh's (default: %(default)s)")
    parser.add_argument("--dense", required=True, metavar="NAME", help="the dense run whose total is the budget")
    parser.add_argument("--rshare", required=True, metavar="NAME", help="an rshare run name starting rshare-R")
    fraction = parser.add_mutually_exclusive_group()
    fraction.add_argument("--tables", type=float, metavar="F", help="budget F times the dense run's embedding+softmax "
                          "parameters, for the rshare run's (default: the dense run's total, for the rshare total)")
    fraction.add_argument("--input-tables", type=float, metavar="F", help="budget F times the dense run's input-table "
                          "parameters, for the rshare run's")
    argv = sys.argv[1:] if argv is None else list(argv)
    model_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:len(argv) - len(model_flags) - ("--" in argv)])
    args.model_flags = model_flags
    if not args.rshare.startswith("rshare-R-") and args.rshare != "rshare-R":
        parser.error(f"--rshare {args.rshare}: start it with rshare-R (R stands for the ratio to find)")
    dictionaries = sorted(glob.glob(os.path.join(args.data_bin, "dict.txt" if args.recipe == "lm" else "dict.*.txt")))
    if not dictionaries:
        parser.error(f"{args.data_bin} holds no dictionary: give the data-bin folder of {args.recipe}.sh's prepare step")
    dictionary = dictionaries[0]
    with open(dictionary) as f:
        words = sum(1 for _ in f) + 4
    if args.tables is not None:
        flag, fraction, count, what = "--tables", args.tables, table_parameters, "embedding+softmax parameters"
    elif args.input_tables is not None:
        flag, fraction, count, what = "--input-tables", args.input_tables, input_table_parameters, \
            "input-table parameters"
    else:
        flag, fraction, count, what = None, None, total_parameters, "parameters"
    if fraction is not None and not 0 < fraction < 1:
        parser.error(f"{flag} {fraction}: give the fraction of the dense tables, between 0 and 1")
    try:
        budget = count(args.data_bin, args.model_flags, args.dense, words, args.recipe)
        if fraction is not None:
            budget = int(fraction * budget)

        @functools.lru_cache(maxsize=None)
        def rshare_count(step):
            return count(args.data_bin, args.model_flags, ratio_name(args.rshare, step), words, args.recipe)

        step = largest_fitting_ratio(lambda step: rshare_count(step) <= budget)
        of_dense = args.dense if fraction is None else f"{fraction:g} x {args.dense}'s"
        if step is None:
            sys.exit(f"recipes.budget: {ratio_name(args.rshare, 1)} already has more than {of_dense} "
                     f"{budget:,} {what}: pick a smaller rshare model")
        print(f"{ratio_name(args.rshare, step)}\t{rshare_count(step):,} {what} <= {of_dense}\t{budget:,}")
    except (variants.VariantError, RShareConfigError) as error:
        sys.exit(f"recipes.budget: {error}")


if __name__ == "__main__":
    main()
