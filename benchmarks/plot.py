"""Plots of the benchmark results: benchmarks/results/{layers,training}.json -> PNG files."""
import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def plot_layers(layers, path):
    figure, axis = plt.subplots(figsize=(6, 4))
    for layer in ("output", "input"):
        for H in sorted({r["H"] for r in layers["rows"] if r["layer"] == layer}):
            rows = sorted((r for r in layers["rows"] if r["layer"] == layer and r["H"] == H), key=lambda r: r["V"])
            axis.plot([r["V"] for r in rows], [r["dense"]["seconds"] / r["rshare"]["seconds"] for r in rows],
                      marker="o", label=f"{layer} layer, H={H}" + (" (loss)" if layer == "output" else ""))
            if layer == "output":
                axis.plot([r["V"] for r in rows], [r["dense"]["seconds"] / r["rshare-lprobs"]["seconds"] for r in rows],
                          marker="x", linestyle="--", label=f"output layer, H={H} (log-probs)")
    axis.axhline(1.0, color="gray", linewidth=0.8)
    axis.set(xscale="log", yscale="log", xlabel="vocabulary V", ylabel="speed-up over dense (fwd+bwd)",
             title=f"rshare layers at {layers['meta']['ratio']:.0%} of dense, K={layers['meta']['K']}")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3, which="both")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def plot_training(training, path):
    labels, speeds, memories = [], [], []
    for row in training["rows"]:
        dense = row["runs"]["dense"]
        for variant, run in row["runs"].items():
            if variant == "dense":
                continue
            labels.append(f"{row['case'].split(' (')[0]}\n{variant}")
            ok = run["ok"] and dense["ok"]
            speeds.append(run["words_per_second"] / dense["words_per_second"] if ok else 0.0)
            memories.append((dense["peak_rss_mb"], run["peak_rss_mb"]))
    figure, axis = plt.subplots(figsize=(7, 0.45 * len(labels) + 1.2))
    axis.barh(range(len(labels)), speeds, color="tab:blue")
    axis.axvline(1.0, color="black", linewidth=0.8)
    axis.set_yticks(range(len(labels)), labels, fontsize=7)
    axis.invert_yaxis()
    axis.set(xlabel="training words/s, rshare over dense (0 = dense failed)",
             title="whole fairseq training")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", default=RESULTS, help="folder with layers.json / training.json")
    args = parser.parse_args(argv)
    for name, draw in (("layers", plot_layers), ("training", plot_training)):
        source = os.path.join(args.results, f"{name}.json")
        if os.path.exists(source):
            with open(source) as f:
                draw(json.load(f), os.path.join(args.results, f"{name}.png"))
            print(f"wrote {os.path.join(args.results, name + '.png')}")


if __name__ == "__main__":
    main()
