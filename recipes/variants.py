"""The recipes' run names: a base, ``dense`` or ``rshare-R``, followed by suffixes, each of which
adds fairseq-train flags. :data:`SUFFIXES` is the grammar's one table; ``python3 -m
recipes.variants --help`` prints it, and the recipes call ``python3 -m recipes.variants lm NAME
--words V`` for a run's flags.

``dense`` is fairseq's dense tables run by the same code (``--rshare-tables none``); ``rshare-R``
random-shares every table at ratio R of dense and trains with ``--criterion
rshare_cross_entropy``. A suffix marked "rshare" needs an rshare base; one marked "lm" or
"translation" belongs to that recipe only.
"""
import argparse
import re
import sys
from dataclasses import dataclass
from typing import Callable

RECIPES = ("lm", "translation")
NUMBER = r"\d*\.?\d+"


class VariantError(ValueError):
    """A run name the grammar does not accept."""


@dataclass(frozen=True)
class Run:
    """What a suffix's flags depend on: the recipe, the base's ratio (None for dense), the
    dictionary's size and whether the name asks for untied translation tables."""
    recipe: str
    ratio: float
    words: int
    untied: bool


@dataclass(frozen=True)
class Suffix:
    name: str  # as the help shows it
    pattern: str  # a regular expression matching the whole suffix
    help: str
    flags: Callable  # (re.Match, Run) -> str
    rshare_only: bool = False
    recipes: tuple = RECIPES


def input_tables(match, run):
    if run.recipe == "lm":
        return "--rshare-tables decoder-input"
    if not run.untied:
        raise VariantError("-input needs untied tables (end the name with -untied)")
    return "--rshare-tables encoder-input,decoder-input"


def hidden_size(match, run):
    size = match["n"]
    return f"--decoder-embed-dim {size} --decoder-hidden-size {size} --decoder-out-embed-dim {size}"


SUFFIXES = (
    Suffix("-input", "input", "the input tables only (the output layer stays dense)", input_tables, True),
    Suffix("-freq", "freq", "frequency aware: the R*V/2 most frequent words keep private sub-vectors, the "
           "rest share the other half", lambda m, run: f"--rshare-frequent-words {int(run.ratio * run.words / 2)}",
           True),
    Suffix("-bias", "bias", "a per-word bias in the random-shared output layer",
           lambda m, run: "--rshare-output-bias", True),
    Suffix("-scale", "scale", "a trained scale per word and sub-vector (--rshare-word-scale)",
           lambda m, run: "--rshare-word-scale", True),
    Suffix("-inR", f"in(?P<r>{NUMBER})", "the input tables' own ratio R",
           lambda m, run: f"--rshare-input-ratio {m['r']}", True),
    Suffix("-outR", f"out(?P<r>{NUMBER})", "the output table's own ratio R",
           lambda m, run: f"--rshare-output-ratio {m['r']}", True),
    Suffix("-kN", r"k(?P<n>[1-9]\d*)", "N sub-vectors a word (--rshare-subvectors N)",
           lambda m, run: f"--rshare-subvectors {m['n']}", True),
    Suffix("-stdS", f"std(?P<s>{NUMBER})", "the pools' initial standard deviation S (--rshare-init-std S)",
           lambda m, run: f"--rshare-init-std {m['s']}", True),
    Suffix("-tied", "tied", "one table for the input and the output layer (--share-decoder-input-output-embed; "
           "rshare-R is then R of one table)", lambda m, run: "--share-decoder-input-output-embed",
           recipes=("lm",)),
    Suffix("-hN", r"h(?P<n>[1-9]\d*)", "embedding, LSTM and output size N instead of the preset's", hidden_size,
           recipes=("lm",)),
    Suffix("-dropP", f"drop(?P<p>{NUMBER})", "dropout P instead of the preset's",
           lambda m, run: f"--dropout {m['p']}"),
    Suffix("-poollrS", f"poollr(?P<s>{NUMBER})", "the pools' learning rate S x the preset's (--pool-lr-scale S)",
           lambda m, run: f"--pool-lr-scale {m['s']}", True, recipes=("lm",)),
    Suffix("-untied", "untied", "three tables (encoder input, decoder input, output) instead of one shared by "
           "all (--share-all-embeddings)", lambda m, run: "", recipes=("translation",)),
)


def flags(recipe, name, words=0):
    """The fairseq-train flags of run `name` in `recipe` (lm or translation), for a dictionary of
    `words` symbols; VariantError names what is wrong."""
    base, *suffixes = name.split("-")
    if base == "rshare":
        if not suffixes or not re.fullmatch(r"0?\.\d+", suffixes[0]) or not 0 < float(suffixes[0]) < 1:
            raise VariantError(f"variant {name!r}: rshare takes a ratio R with 0 < R < 1 next, e.g. rshare-0.1")
        ratio = float(suffixes[0])
        out = [f"--rshare-ratio {suffixes[0]} --criterion rshare_cross_entropy"]
        suffixes = suffixes[1:]
    elif base == "dense":
        ratio, out = None, ["--rshare-tables none"]
    else:
        raise VariantError(f"variant {name!r}: start it with dense or rshare-R")
    run = Run(recipe, ratio, words, untied="untied" in suffixes)
    if recipe == "translation" and not run.untied:
        out.append("--share-all-embeddings")
    seen = set()
    for text in suffixes:
        suffix, match = next(((s, re.fullmatch(s.pattern, text)) for s in SUFFIXES
                              if recipe in s.recipes and re.fullmatch(s.pattern, text)), (None, None))
        if suffix is None:
            known = ", ".join(s.name for s in SUFFIXES if recipe in s.recipes)
            raise VariantError(f"variant {name!r}: unknown suffix '-{text}' for {recipe}.sh (use {known})")
        if suffix.name in seen:
            raise VariantError(f"variant {name!r}: {suffix.name} appears twice")
        if suffix.rshare_only and ratio is None:
            raise VariantError(f"variant {name!r}: {suffix.name} needs an rshare base (rshare-R{suffix.name})")
        seen.add(suffix.name)
        try:
            out.append(suffix.flags(match, run))
        except VariantError as error:
            raise VariantError(f"variant {name!r}: {error}") from None
    return " ".join(part for part in out if part)


def grammar(recipe=None):
    lines = ["dense                fairseq's dense tables (the same code, --rshare-tables none)",
             "rshare-R             every table random-shared at ratio R of dense (0 < R < 1)",
             "then any of the suffixes, each once, e.g. rshare-0.1-bias-k25-tied-h300-drop0.3:"]
    for suffix in SUFFIXES:
        if recipe is None or recipe in suffix.recipes:
            where = [] if suffix.recipes == RECIPES else [f"{'/'.join(suffix.recipes)}.sh only"]
            where += ["rshare"] if suffix.rshare_only else []
            lines.append(f"  {suffix.name:<18} {suffix.help}" + (f" [{', '.join(where)}]" if where else ""))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python3 -m recipes.variants", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Print the fairseq-train flags of each run name (one line each), or stop with one "
                    "line naming what is wrong.", epilog="Run names:\n" + grammar())
    parser.add_argument("recipe", choices=RECIPES)
    parser.add_argument("names", nargs="+", metavar="NAME")
    parser.add_argument("--words", type=int, default=0, help="the dictionary's size (for -freq)")
    args = parser.parse_args(argv)
    try:
        lines = [flags(args.recipe, name, args.words) for name in args.names]
    except VariantError as error:
        sys.exit(f"{args.recipe}.sh: error: {error}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
