"""The recipes' run names: a base, ``dense`` or ``rshare-R``, followed by suffixes, each of which
adds fairseq-train flags. :data:`SUFFIXES` is the grammar's one table; ``python3 -m
recipes.variants --help`` prints it, and the recipes call ``python3 -m recipes.variants lm NAME
--words V`` for a run's flags.

``dense`` is fairseq's dense tables run by the same code (``--rshare-tables none``); ``rshare-R``
random-shares every table at ratio R of dense.  Both train with ``--criterion
rshare_cross_entropy`` (fairseq's cross-entropy, without tokens x V log-probabilities).  A
suffix marked "rshare" needs an rshare base; one marked "lm" or "translation" belongs to that
recipe only.

Runs can start from a trained dense model, their *teacher*: the run ``dense`` with the same
model suffixes (-tied, -hN, -dropP, -untied; e.g. ``rshare-0.1-bias-compress-tied`` starts from
``dense-tied``), whose best checkpoint must exist in the same WORK folder; a run of seed N > 1
starts from the teacher's run of seed N (``dense-tied-seed2``). ``-compress``,
``-kmeans`` and ``-kmeansbal`` compress it (``fairseq-rshare-compress``) and fine-tune the result
on the preset's schedule; ``-distill`` adds its distillation to the loss.
"""
import argparse
import os
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
    """What a suffix's flags depend on: the recipe, the run's name, the base's ratio (None for
    dense), the dictionary's size, whether the name asks for untied translation tables, the
    recipe's WORK folder (where the teacher and the compressed checkpoints are) and the training
    seed (a run of seed N > 1 starts from its teacher's run of seed N)."""
    recipe: str
    name: str
    ratio: float
    words: int
    untied: bool
    work: str
    seed: int

    @property
    def teacher_checkpoint(self):
        best = "checkpoint_best.pt" if self.recipe == "lm" else "checkpoint_average.pt"
        return os.path.join(self.work, seeded(teacher(self.name), self.seed), best)

    @property
    def compressed_checkpoint(self):
        return os.path.join(self.work, "compressed", seeded(self.name, self.seed) + ".pt")


@dataclass(frozen=True)
class Suffix:
    name: str  # as the help shows it
    pattern: str  # a regular expression matching the whole suffix
    help: str
    flags: Callable  # (re.Match, Run) -> str
    rshare_only: bool = False  # table suffixes; the others describe the model, and name the teacher
    recipes: tuple = RECIPES
    stage: str = ""  # how the run starts, for its results JSON: "" from scratch


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
    Suffix("-compress", "compress", "start from the teacher compressed by least squares under the random mapping, "
           "then fine-tune", lambda m, run: f"--finetune-from-model {run.compressed_checkpoint}", True,
           stage="compress + fine-tune"),
    Suffix("-kmeans", "kmeans", "start from the teacher compressed with k-means codes (--rshare-mapping kmeans), "
           "then fine-tune", lambda m, run: f"--rshare-mapping kmeans --finetune-from-model {run.compressed_checkpoint}",
           True, stage="k-means codes + fine-tune"),
    Suffix("-kmeansbal", "kmeansbal", "the same with balanced k-means codes (--rshare-mapping kmeans-balanced)",
           lambda m, run: f"--rshare-mapping kmeans-balanced --finetune-from-model {run.compressed_checkpoint}",
           True, stage="balanced k-means codes + fine-tune"),
    Suffix("-distillW", f"distill(?P<w>{NUMBER})?", "distillation from the teacher, weight W (0.5 without it; "
           "--criterion rshare_distill)", lambda m, run: f"--teacher-path {run.teacher_checkpoint} "
           f"--distill-weight {m['w'] or 0.5}", True, stage="distillation"),
    Suffix("-untied", "untied", "three tables (encoder input, decoder input, output) instead of one shared by "
           "all (--share-all-embeddings)", lambda m, run: "", recipes=("translation",)),
)


def parse(recipe, name, words=0, work="work", seed=1):
    """(Run, [(Suffix, match), ...], base flags) of run `name`; VariantError names what is wrong."""
    base, *suffixes = name.split("-")
    if base == "rshare":
        if not suffixes or not re.fullmatch(r"0?\.\d+", suffixes[0]) or not 0 < float(suffixes[0]) < 1:
            raise VariantError(f"variant {name!r}: rshare takes a ratio R with 0 < R < 1 next, e.g. rshare-0.1")
        ratio = float(suffixes[0])
        out = [f"--rshare-ratio {suffixes[0]}"]
        suffixes = suffixes[1:]
    elif base == "dense":
        ratio, out = None, ["--rshare-tables none"]
    else:
        raise VariantError(f"variant {name!r}: start it with dense or rshare-R")
    run = Run(recipe, name, ratio, words, "untied" in suffixes, work, seed)
    if recipe == "translation" and not run.untied:
        out.append("--share-all-embeddings")
    seen, parsed = set(), []
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
        parsed.append((suffix, match))
    starts = [suffix.name for suffix, _ in parsed if suffix.stage and suffix.name != "-distillW"]
    if len(starts) > 1:
        raise VariantError(f"variant {name!r}: {' and '.join(starts)} are two ways to start: use one")
    distills = any(suffix.name == "-distillW" for suffix, _ in parsed)
    out.insert(1, f"--criterion {'rshare_distill' if distills else 'rshare_cross_entropy'}")
    return run, parsed, out


def flags(recipe, name, words=0, work="work", seed=1):
    """The fairseq-train flags of run `name` in `recipe` (lm or translation), for a dictionary of
    `words` symbols, in the recipe's `work` folder, for training seed `seed`; VariantError names
    what is wrong."""
    run, parsed, out = parse(recipe, name, words, work, seed)
    for suffix, match in parsed:
        try:
            out.append(suffix.flags(match, run))
        except VariantError as error:
            raise VariantError(f"variant {name!r}: {error}") from None
    return " ".join(part for part in out if part)


def teacher(name):
    """The dense run that `name` starts from or distils: dense with its model suffixes."""
    return "-".join(["dense"] + [text for text in name.split("-")[1:]
                                 if any(not s.rshare_only and re.fullmatch(s.pattern, text) for s in SUFFIXES)])


def seeded(name, seed):
    """The run folder and results name of run `name` trained with `seed` (as recipes/common.sh's)."""
    return name if seed == 1 else f"{name}-seed{seed}"


def teacher_checkpoint(recipe, name, work="work", seed=1):
    """The checkpoint run `name` starts from or distils, "" for a run that needs none."""
    run, parsed, _ = parse(recipe, name, work=work, seed=seed)
    return run.teacher_checkpoint if any(suffix.stage for suffix, _ in parsed) else ""


def stage(recipe, name):
    """How run `name` starts, in words: "scratch", or its stages joined by " + "."""
    _, parsed, _ = parse(recipe, name)
    stages = [suffix.stage for suffix, _ in parsed if suffix.stage and suffix.name != "-distillW"] or ["scratch"]
    return " + ".join(stages + [suffix.stage for suffix, _ in parsed if suffix.name == "-distillW"])


def compress_flags(recipe, name, words=0, work="work", seed=1):
    """fairseq-rshare-compress's arguments for run `name` (its --rshare-* flags, the teacher's
    checkpoint and the output), or "" for a run that does not start compressed."""
    run, parsed, _ = parse(recipe, name, words, work, seed)
    if not any(suffix.stage and suffix.name != "-distillW" for suffix, _ in parsed):
        return ""
    tokens = flags(recipe, name, words, work, seed).split()
    kept = [token for i, token in enumerate(tokens) if token.startswith("--rshare-")
            or (i and tokens[i - 1].startswith("--rshare-") and not token.startswith("--"))]
    return " ".join([run.teacher_checkpoint, run.compressed_checkpoint, *kept])


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
    parser.add_argument("--work", default="work", help="the recipe's WORK folder")
    parser.add_argument("--seed", type=int, default=1, help="the training seed (its teacher's run of the same seed)")
    parser.add_argument("--print", choices=("flags", "compress", "teacher", "stage"), default="flags",
                        help="fairseq-train flags; fairseq-rshare-compress arguments (empty for a run that "
                             "does not start compressed); the teacher's checkpoint (empty for a run from "
                             "scratch without distillation); how the run starts")
    args = parser.parse_args(argv)
    parts = {
        "flags": lambda name: flags(args.recipe, name, args.words, args.work, args.seed),
        "compress": lambda name: compress_flags(args.recipe, name, args.words, args.work, args.seed),
        "teacher": lambda name: teacher_checkpoint(args.recipe, name, args.work, args.seed),
        "stage": lambda name: stage(args.recipe, name),
    }
    try:
        lines = [parts[args.print](name) for name in args.names]
    except VariantError as error:
        sys.exit(f"{args.recipe}.sh: error: {error}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
