"""Speed and peak memory of the rshare output layer and input embedding against dense ones.

    python benchmarks/bench_layers.py                 # the full grid, ~15 min on 2 cores
    python benchmarks/bench_layers.py --smoke         # tiny sizes, seconds (what CI runs)

Every (layer, V, H) case runs its variants in turn, each inside a fresh process (so that peak
RSS belongs to that variant alone), repeated; the figures are medians and the ratios are
dense/rshare from the same run.  The output layer has two rshare variants: "rshare", the
cross-entropy computed from the pool scores (RandomSharedOutput.loss, what training with
--criterion rshare_cross_entropy runs), and "rshare-lprobs", the (tokens, V) log-probabilities
then nll_loss (what fairseq's stock criteria, eval-lm and generation consume).
Writes benchmarks/results/layers.json and .md.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def build(layer, variant, V, H, K, ratio):
    from fairseq_rshare.models.rshare_config import pool_size_of_ratio
    from fairseq_rshare.modules import RandomSharedEmbedding, RandomSharedOutput

    if variant == "dense":
        if layer == "output":
            return torch.nn.Linear(H, V, bias=False)
        return torch.nn.Embedding(V, H, padding_idx=1)
    table = RandomSharedEmbedding(V, H, 1, K, pool_size_of_ratio(V, K, ratio))
    return RandomSharedOutput(table, path="pool-scores") if layer == "output" else table


def measure(layer, variant, V, H, K, ratio, tokens, repeats):
    """Median seconds of forward+backward (with the cross-entropy loss for the output layer)."""
    torch.manual_seed(0)
    module = build(layer, variant, V, H, K, ratio)
    targets = torch.randint(V, (tokens,))
    features = torch.randn(tokens, H, requires_grad=True)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        if layer == "output" and variant == "dense":
            F.cross_entropy(module(features), targets).backward()
        elif layer == "output" and variant == "rshare":
            module.loss(features, targets)[0].div(tokens).backward()
        elif layer == "output":  # rshare-lprobs: the layer returns log-probabilities already
            F.nll_loss(module(features), targets).backward()
        else:
            module(targets).sum().backward()
        times.append(time.perf_counter() - start)
        module.zero_grad(set_to_none=True)
    return {
        "seconds": statistics.median(times[1:]),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "params": sum(p.numel() for p in module.parameters()),
    }


def run_case(layer, variant, V, H, K, ratio, tokens, repeats):
    """Run one measurement in a fresh process; return its result dict."""
    output = subprocess.run(
        [sys.executable, __file__, "--one", json.dumps([layer, variant, V, H, K, ratio, tokens, repeats])],
        capture_output=True, text=True, check=True,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def grid(smoke):
    if smoke:
        return [("output", 2000, 64), ("input", 2000, 64)], 64, 2
    cases = [("output", V, H) for H in (512, 1024) for V in (10_000, 33_000, 100_000, 800_000)]
    cases += [("input", V, 512) for V in (10_000, 100_000, 800_000)]
    return cases, 512, 3


def markdown(rows, meta):
    lines = [
        f"Measured {meta['date']} on {meta['machine']}, torch {meta['torch']}, "
        f"{meta['threads']} threads; K={meta['K']}, rshare table {meta['ratio']:.0%} of dense, "
        f"{meta['tokens']} tokens a batch, median of {meta['repeats']}.",
        "",
        "Output layer: rshare = loss from the pool scores; log-probs = (tokens, V) log-probabilities, then NLL.",
        "",
        "| layer | V | H | dense ms | rshare ms | speed-up | log-probs ms | speed-up "
        "| peak RSS MB dense / rshare / log-probs | params dense / rshare |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d, s, lp = r["dense"], r["rshare"], r.get("rshare-lprobs")
        lines.append(
            f"| {r['layer']} | {r['V']:,} | {r['H']} | {d['seconds'] * 1e3:.1f} | {s['seconds'] * 1e3:.1f} "
            f"| {d['seconds'] / s['seconds']:.2f}× "
            + (f"| {lp['seconds'] * 1e3:.1f} | {d['seconds'] / lp['seconds']:.2f}× " if lp else "| – | – ")
            + f"| {d['peak_rss_mb']:.0f} / {s['peak_rss_mb']:.0f}"
            + (f" / {lp['peak_rss_mb']:.0f} " if lp else " ")
            + f"| {d['params'] / s['params']:.0f}× |"
        )
    return "\n".join(lines) + "\n"


def save_results(folder, name, meta, rows, table):
    """Write NAME.json (meta and rows) and NAME.md (the table) into folder; print the table."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{name}.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(os.path.join(folder, f"{name}.md"), "w") as f:
        f.write(table)
    print(table)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the benchmark runs")
    parser.add_argument("--subvectors", type=int, default=8)
    parser.add_argument("--ratio", type=float, default=0.01, help="rshare table size / dense")
    parser.add_argument("--out", default=RESULTS, help="folder for layers.json and layers.md")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*json.loads(args.one))))
        return

    cases, tokens, repeats = grid(args.smoke)
    rows = []
    for layer, V, H in cases:
        row = {"layer": layer, "V": V, "H": H}
        variants = ("dense", "rshare", "rshare-lprobs") if layer == "output" else ("dense", "rshare")
        for variant in variants:
            row[variant] = run_case(layer, variant, V, H, args.subvectors, args.ratio, tokens, repeats)
        print(f"{layer} V={V} H={H}: dense {row['dense']['seconds'] * 1e3:.1f} ms, rshare "
              f"{row['rshare']['seconds'] * 1e3:.1f} ms ({row['dense']['seconds'] / row['rshare']['seconds']:.2f}×)",
              flush=True)
        rows.append(row)
    meta = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "K": args.subvectors,
        "ratio": args.ratio, "tokens": tokens, "repeats": repeats,
    }
    save_results(args.out, "layers", meta, rows, markdown(rows, meta))


if __name__ == "__main__":
    main()
