"""Turn the recipes' results JSONs into one markdown table and a PNG plot.

Each (corpus, preset) group is compared with its dense run: the table gives every run's
embedding+softmax parameters as a fraction of dense and its metric's change from dense; the
plot shows perplexity or BLEU against embedding+softmax parameters (top row) and against all
parameters (bottom row: the same-budget comparison), one column per group. A line joins the dense
runs, and another the rshare runs, that beat every run of their kind with no more parameters: the
best model of each kind at each budget.
"""
import argparse
import glob
import json
import os
import sys

try:
    import matplotlib
except ImportError:
    sys.exit('results_table: error: matplotlib not found: pip install torch==2.13.0 -e ".[recipes]" (in this repository)')

METRICS = {"test_ppl": "test ppl", "test_bleu": "test BLEU"}


def load(paths):
    results = []
    for path in paths:
        files = sorted(glob.glob(os.path.join(path, "*.json"))) if os.path.isdir(path) else [path]
        for file in files:
            with open(file) as f:
                try:
                    results.append(json.load(f))
                except json.JSONDecodeError as error:
                    sys.exit(f"results_table: error: {file} is not valid JSON ({error})")
    if not results:
        sys.exit("results_table: error: no results JSON found in " + ", ".join(paths))
    return results


def metric_of(result):
    return next(key for key in METRICS if key in result)


def groups(results):
    grouped = {}
    for result in results:
        grouped.setdefault((result["corpus"], result["preset"]), []).append(result)
    for runs in grouped.values():
        runs.sort(key=lambda r: (r["variant"] != "dense", -r["embedding_softmax_params"], r["variant"]))
    return grouped


def markdown(results):
    lines = [
        "| corpus | preset | run | metric | value | vs dense | emb+softmax params | of dense "
        "| other params | total params | checkpoint MB | train words/s | train min |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (corpus, preset), runs in groups(results).items():
        dense = next((r for r in runs if r["variant"] == "dense"), None)
        for run in runs:
            metric = metric_of(run)
            change = fraction = "–"
            if dense is not None and metric in dense:
                change = f"{run[metric] - dense[metric]:+.2f}" if metric == "test_bleu" else \
                    f"{100 * (run[metric] / dense[metric] - 1):+.1f} %"
                fraction = f"{100 * run['embedding_softmax_params'] / dense['embedding_softmax_params']:.1f} %"
            lines.append(
                f"| {corpus} | {preset} | {run['variant']} | {METRICS[metric]} | {run[metric]:.2f} "
                f"| {change} | {run['embedding_softmax_params']:,} | {fraction} "
                f"| {run['params']['body']:,} | {total_params(run):,} | {run['checkpoint_bytes'] / 1e6:.1f} "
                f"| {run['words_per_second']:,.0f} | {run['train_seconds'] / 60:.1f} |"
            )
    return "\n".join(lines) + "\n"


def total_params(run):
    return sum(run["params"].values())


def best_at_budget(runs, params_of, metric):
    """The runs better than every run with no more parameters, by parameters; a tie in parameters
    keeps the better run."""
    sign = 1 if metric == "test_bleu" else -1  # BLEU: higher is better; perplexity: lower
    curve = []
    for run in sorted(runs, key=lambda r: (params_of(r), -sign * r[metric])):
        if not curve or sign * (run[metric] - curve[-1][metric]) > 0:
            curve.append(run)
    return curve


def plot(results, path):
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    grouped = groups(results)
    figure, axes = plt.subplots(2, len(grouped), figsize=(4.5 * len(grouped), 7.6), squeeze=False)
    for column, ((corpus, preset), runs) in enumerate(grouped.items()):
        metric = metric_of(runs[0])
        for axis, params_of, label in ((axes[0][column], lambda r: r["embedding_softmax_params"],
                                        "embedding + softmax parameters"),
                                       (axes[1][column], total_params, "all parameters (same budget)")):
            for dense, color, marker in ((True, "black", "s"), (False, "tab:blue", "o")):
                kind = [run for run in runs if run["variant"].startswith("dense") == dense]
                for run in kind:
                    x = params_of(run)
                    axis.scatter(x, run[metric], marker=marker, color=color)
                    axis.annotate(run["variant"], (x, run[metric]), textcoords="offset points", xytext=(4, 4),
                                  fontsize=8)
                curve = best_at_budget(kind, params_of, metric)
                axis.plot([params_of(run) for run in curve], [run[metric] for run in curve], color=color,
                          alpha=0.5)
            axis.set_xscale("log")
            axis.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
            axis.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1e6:g}M" if x >= 1e6 else f"{x / 1e3:g}k"))
            axis.xaxis.set_minor_formatter(NullFormatter())
            axis.tick_params(axis="x", labelsize=7, labelrotation=30)
            axis.set_xlabel(label)
            axis.set_ylabel(METRICS[metric])
            axis.set_title(f"{corpus} ({preset} preset)")
            axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", nargs="+", help="results JSON files or folders holding them")
    parser.add_argument("--markdown", default="results.md", help="markdown table to write")
    parser.add_argument("--plot", default="results.png", help="PNG plot to write")
    args = parser.parse_args(argv)
    results = load(args.results)
    table = markdown(results)
    with open(args.markdown, "w") as f:
        f.write(table)
    plot(results, args.plot)
    print(table)
    print(f"wrote {args.markdown} and {args.plot}")


if __name__ == "__main__":
    main()
