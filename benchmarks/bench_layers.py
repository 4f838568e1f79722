"""Speed and peak memory of the rshare output layer and input embedding against dense ones.

    python benchmarks/bench_layers.py                 # the full grid, ~15 min on 2 cores
    python benchmarks/bench_layers.py --smoke         # tiny sizes, seconds (what CI runs)

Every (layer, V, H) case runs its variants in turn, each inside a fresh process (so that peak
RSS belongs to that variant alone), repeated; the figures are medians and the ratios are
dense/rshare from the same run.  Gradients are set to None after every step, as fairseq's
optimizer does; the output layer is timed a second time with its gradients kept and zeroed in
place (plain PyTorch's habit), where dense no longer allocates a fresh V x H gradient each step.
Beside the loss path's time stands its memory-traffic bound: the bytes it must move
(:func:`loss_path_bytes`) over the copy bandwidth measured at the start.  The output layer has
two rshare variants: "rshare", the cross-entropy computed from the pool scores
(RandomSharedOutput.loss, what training with --criterion rshare_cross_entropy runs), and
"rshare-lprobs", the (tokens, V) log-probabilities then nll_loss (what fairseq's stock criteria, eval-lm and generation consume).
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
    from fairseq_rshare.mapping import pool_size_of_ratio
    from fairseq_rshare.modules import RandomSharedEmbedding, RandomSharedOutput

    if variant == "dense":
        if layer == "output":
            return torch.nn.Linear(H, V, bias=False)
        return torch.nn.Embedding(V, H, padding_idx=1)
    table = RandomSharedEmbedding(V, H, 1, K, pool_size_of_ratio(V, K, ratio))
    return RandomSharedOutput(table, path="pool-scores") if layer == "output" else table


def loss_path_bytes(V, K, R, tokens, tile=8):
    """Bytes the pool-scores loss must read and write for a batch, at least: the (V, K) int32
    mapping twice per tile of 8 tokens (to gather the logits, then to scatter their gradient),
    and the (tokens, R) float32 score table written, read twice, its gradient written and read
    back by the pool-score matmul's backward."""
    tiles = -(-tokens // tile)
    return 2 * tiles * V * K * 4 + 5 * tokens * R * 4


def copy_bandwidth():
    """Bytes per second that a large float32 copy reads plus writes here."""
    source = torch.randn(32 * 2**20)
    target = torch.empty_like(source)
    target.copy_(source)
    start = time.perf_counter()
    for _ in range(5):
        target.copy_(source)
    return 5 * 2 * source.numel() * 4 / (time.perf_counter() - start)


def measure(layer, variant, V, H, K, ratio, tokens, repeats, keep_grads=False):
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
        module.zero_grad(set_to_none=not keep_grads)
    return {
        "seconds": statistics.median(times[1:]),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "params": sum(p.numel() for p in module.parameters()),
    }


def run_case(layer, variant, V, H, K, ratio, tokens, repeats, keep_grads=False):
    """Run one measurement in a fresh process; return its result dict."""
    output = subprocess.run(
        [sys.executable, __file__, "--one", json.dumps([layer, variant, V, H, K, ratio, tokens, repeats, keep_grads])],
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
        f"{meta['tokens']} tokens a batch, median of {meta['repeats']}; copy bandwidth "
        f"{meta['copy_gb_per_s']:.1f} GB/s.",
        "",
        "Output layer: rshare = loss from the pool scores; log-probs = (tokens, V) log-probabilities, then NLL; "
        "bound = the loss path's bytes over the copy bandwidth; kept = gradients kept and zeroed in place.",
        "",
        "| layer | V | H | dense ms | rshare ms | speed-up | bound ms | log-probs ms | speed-up "
        "| kept: dense ms | kept: rshare ms | kept: speed-up "
        "| peak RSS MB dense / rshare / log-probs | params dense / rshare |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d, s, lp = r["dense"], r["rshare"], r.get("rshare-lprobs")
        cells = [r["layer"], f"{r['V']:,}", str(r["H"]), f"{d['seconds'] * 1e3:.1f}", f"{s['seconds'] * 1e3:.1f}",
                 f"{d['seconds'] / s['seconds']:.2f}×"]
        if lp:
            dk, sk = r["dense-kept"], r["rshare-kept"]
            cells += [f"{r['bound_seconds'] * 1e3:.2f}", f"{lp['seconds'] * 1e3:.1f}", f"{d['seconds'] / lp['seconds']:.2f}×",
                      f"{dk['seconds'] * 1e3:.1f}", f"{sk['seconds'] * 1e3:.1f}", f"{dk['seconds'] / sk['seconds']:.2f}×",
                      f"{d['peak_rss_mb']:.0f} / {s['peak_rss_mb']:.0f} / {lp['peak_rss_mb']:.0f}"]
        else:
            cells += ["–"] * 6 + [f"{d['peak_rss_mb']:.0f} / {s['peak_rss_mb']:.0f}"]
        cells.append(f"{d['params'] / s['params']:.0f}×")
        lines.append("| " + " | ".join(cells) + " |")
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

    from fairseq_rshare.mapping import pool_size_of_ratio

    cases, tokens, repeats = grid(args.smoke)
    bandwidth = copy_bandwidth()
    rows = []
    for layer, V, H in cases:
        row = {"layer": layer, "V": V, "H": H}
        K = args.subvectors
        variants = ("dense", "rshare", "rshare-lprobs") if layer == "output" else ("dense", "rshare")
        for variant in variants:
            row[variant] = run_case(layer, variant, V, H, K, args.ratio, tokens, repeats)
        if layer == "output":
            for variant in ("dense", "rshare"):
                row[variant + "-kept"] = run_case(layer, variant, V, H, K, args.ratio, tokens, repeats, True)
            row["bound_seconds"] = loss_path_bytes(V, K, pool_size_of_ratio(V, K, args.ratio), tokens) / bandwidth
        print(f"{layer} V={V} H={H}: dense {row['dense']['seconds'] * 1e3:.1f} ms, rshare "
              f"{row['rshare']['seconds'] * 1e3:.1f} ms ({row['dense']['seconds'] / row['rshare']['seconds']:.2f}×)",
              flush=True)
        rows.append(row)
    meta = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "K": args.subvectors,
        "ratio": args.ratio, "tokens": tokens, "repeats": repeats, "copy_gb_per_s": bandwidth / 1e9,
    }
    save_results(args.out, "layers", meta, rows, markdown(rows, meta))


if __name__ == "__main__":
    main()
