"""What each stage of a compressed model costs, through the LM recipe itself: seconds per training
update of the dense teacher, of an rshare model from scratch, of the k-means-compressed model's
fine-tune, and of that fine-tune with distillation (which also runs the teacher), plus the wall
time of `fairseq-rshare-compress`.

    python benchmarks/bench_stages.py            # PTB, the cpu preset's tied 150-wide runs (~9 min)
    python benchmarks/bench_stages.py --smoke    # the smoke preset, a few updates (what CI runs)

Every run is `recipes/lm.sh` on the real corpus with `--max-update`, `--log-interval 10` and a
5-batch validation added; the runs are repeated with the stages interleaved, and each figure is
the median of its repeats. Seconds per update are steady: the first 10 updates (start-up) are
left out. A run's total compute is then its updates times its stage's cost; the teacher's
weights do not change what an update costs, so the teacher here trains only as long as the
others. Writes benchmarks/results/stages.json and .md.
"""
import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from bench_layers import save_results
from bench_training import LOG_INTERVAL, steady_intervals

from fairseq_rshare.tools import environment_with_tools

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
PTB = os.path.join(os.environ.get("RSHARE_DATA", os.path.join(REPO, "..", "shared", "data")), "ptb")

# (preset, the teacher, then the students); the students' teacher is the dense run with their
# model suffixes, so it must be the first name. 0.093 from scratch and 0.072 with k-means codes
# are the two ways to reach 10 % of the tables on PTB (the codes' bytes count in the second).
RUNS = {
    False: ("cpu", ["dense-tied-h150-drop0.3", "rshare-0.093-bias-k10-tied-h150-drop0.3",
                    "rshare-0.072-bias-kmeans-k10-tied-h150-drop0.3",
                    "rshare-0.072-bias-kmeans-distill-k10-tied-h150-drop0.3"]),
    True: ("smoke", ["dense-tied", "rshare-0.1-bias-tied", "rshare-0.1-bias-kmeans-tied",
                     "rshare-0.1-bias-kmeans-distill-tied"]),
}


def steady_seconds_per_update(train_log):
    """Seconds per update after a fairseq-train log's first LOG_INTERVAL updates, or None for a
    shorter run."""
    updates, _, seconds = steady_intervals(train_log)
    return seconds / updates if updates else None


def recipe(work, preset, corpus, steps, variant, extra="", threads=1):
    """recipes/lm.sh with STEPS=steps for one variant (or none, for prepare) in work; its error line
    ends the benchmark."""
    environment = environment_with_tools({
        **os.environ, "WORK": work, "PRESET": preset, "DATA": corpus, "STEPS": steps, "VARIANTS": variant,
        "EXTRA": extra, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    process = subprocess.run(["bash", os.path.join(REPO, "recipes", "lm.sh")], env=environment,
                             capture_output=True, text=True)
    if process.returncode:  # lm.sh's last line names what to change
        raise SystemExit((process.stderr.strip().splitlines() or [f"recipes/lm.sh failed ({steps} {variant})"])[-1])


def stage_cost(work, preset, corpus, variant, updates, threads):
    """One training of variant from scratch (or from its compressed teacher): (steady seconds per
    update, the compress command's seconds or None)."""
    run = os.path.join(work, variant)
    shutil.rmtree(run, ignore_errors=True)
    compressed = os.path.join(work, "compressed", variant + ".seconds")
    if os.path.exists(compressed):
        os.remove(compressed)
    recipe(work, preset, corpus, "train", variant, threads=threads,
           extra=f"--max-update {updates} --log-interval {LOG_INTERVAL} --max-valid-steps 5")
    with open(os.path.join(run, "train.log")) as f:
        seconds = steady_seconds_per_update(f.read())
    compress = None
    if os.path.exists(compressed):
        with open(compressed) as f:
            compress = float(f.read())
    return seconds, compress


def stage_of(variant):
    """How run `variant` of lm.sh starts, in words (recipes.variants' stage)."""
    return subprocess.run(
        [sys.executable, "-m", "recipes.variants", "lm", "--print", "stage", variant], cwd=REPO, check=True,
        capture_output=True, text=True).stdout.strip()


def markdown(rows, meta):
    teacher = rows[0]["seconds_per_update"]
    lines = [f"Measured on {meta['machine']}, torch {meta['torch']}, {meta['threads']} thread(s), "
             f"{meta['corpus']}, the {meta['preset']} preset, {meta['updates']} updates a run; median of "
             f"{meta['repeats']} interleaved repeats; {meta['date']}.", "",
             "| run | stage | seconds / update | vs the dense teacher | compress seconds |", "|---|---|---|---|---|"]
    for row in rows:
        compress = f"{row['compress_seconds']:.0f}" if row["compress_seconds"] is not None else "–"
        lines.append(f"| {row['variant']} | {row['stage']} | {row['seconds_per_update']:.4f} "
                     f"| {row['seconds_per_update'] / teacher:.2f}× | {compress} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="the smoke preset, a few updates")
    parser.add_argument("--corpus", default=PTB, help="folder with train.txt, valid.txt, test.txt [%(default)s]")
    parser.add_argument("--updates", type=int, help="updates a run [120; smoke 30]")
    parser.add_argument("--repeats", type=int, help="interleaved repeats [2; smoke 1]")
    parser.add_argument("--threads", type=int, default=1, help="torch threads a run [%(default)s]")
    parser.add_argument("--out", default=RESULTS, help="folder for stages.json and stages.md")
    args = parser.parse_args()
    updates = args.updates if args.updates is not None else (30 if args.smoke else 120)
    repeats = args.repeats if args.repeats is not None else (1 if args.smoke else 2)
    if repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads take a whole number from 1")
    if updates <= 2 * LOG_INTERVAL:
        parser.error(f"--updates {updates}: give more than {2 * LOG_INTERVAL}, so that a steady interval remains")
    preset, variants = RUNS[args.smoke]
    measured = {variant: [] for variant in variants}
    with tempfile.TemporaryDirectory() as work:
        recipe(work, preset, args.corpus, "prepare", "")
        for _ in range(repeats):
            for variant in variants:
                measured[variant].append(stage_cost(work, preset, args.corpus, variant, updates, args.threads))
    rows = []
    for variant, runs in measured.items():
        compress = [c for _, c in runs if c is not None]
        rows.append({"variant": variant, "stage": stage_of(variant),
                     "seconds_per_update": statistics.median(s for s, _ in runs),
                     "compress_seconds": statistics.median(compress) if compress else None})
        print(f"{variant}: {rows[-1]['seconds_per_update']:.4f} s/update", flush=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "torch": __import__("torch").__version__, "threads": args.threads, "preset": preset,
            "corpus": os.path.basename(os.path.normpath(args.corpus)), "updates": updates, "repeats": repeats}
    save_results(args.out, "stages", meta, rows, markdown(rows, meta))


if __name__ == "__main__":
    main()
