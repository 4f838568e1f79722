"""`auto` against the path it picks, whole fairseq-train, many interleaved pairs.

The training benchmark's 3 repeats found `auto` 10 % behind forced pool-scores at the PTB shape
with 200 pool entries per position; this runs the two side by side `--repeats` times (default
4) to tell a real residue of auto's one-off timing from run-to-run spread, each pair also with
glibc's dynamic mmap threshold fixed (MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_), in
case the timed step's large allocations leave the allocator in another state.
Writes every run and the medians to --out (JSON).
"""
import argparse
import json
import os
import statistics
import tempfile
import time

import bench_training as bench

FIXED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(64 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--out", default=os.path.join(bench.RESULTS, "auto-vs-forced.json"))
    args = parser.parse_args()
    runs = {}
    with tempfile.TemporaryDirectory() as work:
        data = bench.synthetic_lm_data(os.path.join(work, "lm"), 10_000, 2240 * 40 + 5000, 2000)
        variants = {path: bench.lm_flags(200, 2, 40, 2240, ["--rshare-pool-size", "1600", "--rshare-output-path",
                                                             path, *bench.RSHARE])
                    for path in ("pool-scores", "auto")}
        for repeat in range(args.repeats):
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
    medians = {name: {key: statistics.median(r[key] for r in results)
                      for key in ("words_per_second", "steady_words_per_second", "peak_rss_mb")}
               for name, results in runs.items()}
    with open(args.out, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d"), "shape": "V=10k, 2x200, K=8, 200 entries/position, 40 updates "
                   "of 2,240 tokens", "repeats": args.repeats, "medians": medians, "runs": runs}, f, indent=1)
    for name, median in medians.items():
        print(name, median)


if __name__ == "__main__":
    main()
