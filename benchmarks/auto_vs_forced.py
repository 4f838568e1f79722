"""`auto` against the forced output paths, many interleaved runs, in three regimes.

training (default out: results/auto-vs-forced.json): the training benchmark's 3 repeats found
`auto` 10 % behind forced pool-scores at the PTB shape with 200 pool entries per position; this
runs the two side by side `--repeats` times (default 4) to tell a real residue of auto's
one-off timing from run-to-run spread, each pair also with glibc's dynamic mmap threshold fixed
(MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_), in case the timed step's large allocations
leave the allocator in another state.

evaluation (default out: results/auto-vs-forced-evaluation.json): fairseq-eval-lm tokens/s of
one checkpoint per shape (PTB shape, 2000 and 200 pool entries per position) run with each path
forced (--model-overrides) and with auto, interleaved `--repeats` times, on an 82k-token stream
(PTB test's size) in batches of 2,240 tokens, as the training benchmark evaluates.
recipes (default out: results/auto-vs-forced-recipes.json): whole fairseq-train at the
recipes' default shapes, dense and rshare with each path forced and auto, interleaved
`--repeats` times: the LM recipe's rshare (V=10k, 2x200, 10 %, output bias; 40 updates of 2,240
tokens) and the Multi30k transformer's table (V=7.8k, H=256, 10 %, one table shared by all;
the training benchmark's 3+3x256 model, 30 updates; needs ../shared/data/multi30k).
Writes every run and the medians to --out (JSON).
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import bench_training as bench

FIXED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(64 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}
PATHS = ("pool-scores", "materialize", "auto")


def training_runs(work, repeats):
    runs = {}
    data = bench.synthetic_lm_data(os.path.join(work, "lm"), 10_000, 2240 * 40 + 5000, 2000)
    variants = {path: bench.lm_flags(200, 2, 40, 2240, ["--rshare-pool-size", "1600", "--rshare-output-path",
                                                         path, *bench.RSHARE])
                for path in ("pool-scores", "auto")}
    for repeat in range(repeats):
        for malloc in ("default", "fixed"):
            for path, flags in variants.items():
                saved = dict(os.environ)
                if malloc == "fixed":
                    os.environ.update(FIXED_MALLOC)
                result = bench.train(data, flags, os.path.join(work, "save"))
                os.environ.clear()
                os.environ.update(saved)
                runs.setdefault(f"{path}, malloc {malloc}", []).append(result)
                print(repeat, path, malloc, result.get("words_per_second"), result.get("steady_words_per_second"),
                      result["peak_rss_mb"], flush=True)
    keys = ("words_per_second", "steady_words_per_second", "peak_rss_mb")
    shape = "V=10k, 2x200, K=8, 200 entries/position, 40 updates of 2,240 tokens"
    return shape, keys, runs


def evaluation_runs(work, repeats):
    runs = {}
    data = bench.synthetic_lm_data(os.path.join(work, "lm"), 10_000, 2240 * 5 + 5000, 82_000)
    for per_position in (2000, 200):
        save_dir = os.path.join(work, f"save{per_position}")
        flags = bench.lm_flags(200, 2, 5, 2240, ["--rshare-pool-size", str(8 * per_position), *bench.RSHARE])
        if not bench.train(data, flags, save_dir, keep_checkpoint=True)["ok"]:
            raise SystemExit(f"auto_vs_forced.py: training the {per_position}/position checkpoint failed")
        for repeat in range(repeats):
            for path in PATHS:
                override = ["--model-overrides", repr({"rshare_output_path": path})]
                result = bench.evaluation_speed("lm", data, save_dir, override)
                runs.setdefault(f"{per_position}/position, {path}", []).append(result)
                print(repeat, per_position, path, result, flush=True)
    shape = "V=10k, 2x200, K=8, eval-lm on 82k tokens in batches of 2,240"
    return shape, ("eval_tokens_per_second",), runs


def recipe_shape_runs(work, repeats):
    lm_data = bench.synthetic_lm_data(os.path.join(work, "lm"), 10_000, 2240 * 40 + 5000, 2000)
    cases = {"LM recipe (V=10k, 2x200, 10 %, bias)": (
        lm_data, lambda variant: bench.lm_flags(200, 2, 40, 2240, variant),
        ["--rshare-ratio", "0.1", "--rshare-output-bias"])}
    if os.path.isdir(bench.MULTI30K):
        cases["Multi30k transformer (V=7.8k, 3+3x256, 10 %)"] = (
            bench.multi30k_data(os.path.join(work, "multi30k")), lambda variant: bench.nmt_flags(30, variant),
            ["--rshare-ratio", "0.1"])
    variants = {case: {"dense": flags(bench.DENSE),
                       **{path: flags([*rshare, "--rshare-output-path", path, *bench.RSHARE]) for path in PATHS}}
                for case, (_, flags, rshare) in cases.items()}
    runs = {}
    for repeat in range(repeats):
        for case, (data, _, _) in cases.items():
            for variant, variant_flags in variants[case].items():
                result = bench.train(data, variant_flags, os.path.join(work, "save"))
                if not result["ok"]:
                    raise SystemExit(f"auto_vs_forced.py: {case}, {variant}: fairseq-train failed: {result['error']}")
                runs.setdefault(f"{case}, {variant}", []).append(result)
                print(repeat, case, variant, result.get("words_per_second"), result.get("steady_words_per_second"),
                      flush=True)
    shape = "the LM recipe's and the Multi30k transformer's default rshare shapes, whole fairseq-train"
    return shape, ("words_per_second", "steady_words_per_second", "peak_rss_mb"), runs


REGIMES = {"training": (training_runs, "auto-vs-forced.json"),
           "evaluation": (evaluation_runs, "auto-vs-forced-evaluation.json"),
           "recipes": (recipe_shape_runs, "auto-vs-forced-recipes.json")}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regime", choices=REGIMES, default="training")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--out")
    args = parser.parse_args()
    runner, name = REGIMES[args.regime]
    out = args.out or os.path.join(bench.RESULTS, name)
    with tempfile.TemporaryDirectory() as work:
        shape, keys, runs = runner(work, args.repeats)
    medians = {name: {key: statistics.median(r[key] for r in results if key in r) for key in keys}
               for name, results in runs.items()}
    with open(out, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d"), "regime": args.regime, "shape": shape,
                   "command": " ".join(["python", "benchmarks/auto_vs_forced.py", *sys.argv[1:]]),
                   "repeats": args.repeats, "medians": medians, "runs": runs}, f, indent=1)
    for name, median in medians.items():
        print(name, median)


if __name__ == "__main__":
    main()
