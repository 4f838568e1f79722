"""fairseq-rshare-demo: train a dense and an rshare LSTM LM side by side and compare them.

Everything runs through the stock fairseq command-line tools (preprocess, train, eval-lm).
Without --data it trains on a small corpus it generates itself (a random Zipfian bigram
language), so it runs offline on any machine; --data DIR takes train.txt, valid.txt and
test.txt (one tokenised sentence a line), e.g. Mikolov's PTB.
"""
import argparse
import os
import re
import subprocess
import sys
import time

import numpy as np

from .checkpoints import parameters_by_component

USER_DIR = os.path.dirname(os.path.abspath(__file__))
SPLITS = ("train", "valid", "test")


def make_corpus(out_dir, vocab_size=3000, sentences=(30000, 2000, 2000), seed=0):
    """Write train/valid/test.txt from a random bigram language with Zipfian word frequencies.

    Each word has 12 likely successors, so a model that learns the bigrams beats the
    unigram perplexity by a wide margin.
    """
    rng = np.random.default_rng(seed)
    zipf = 1.0 / np.arange(1, vocab_size + 1)
    zipf /= zipf.sum()
    successors = rng.choice(vocab_size, size=(vocab_size, 12), p=zipf)
    successor_cdf = np.cumsum(rng.dirichlet(np.ones(12) * 0.5, size=vocab_size), axis=1)
    os.makedirs(out_dir, exist_ok=True)
    for split, count in zip(SPLITS, sentences):
        lengths = rng.integers(5, 26, size=count)
        words = np.empty((count, lengths.max()), dtype=np.int64)
        words[:, 0] = rng.choice(vocab_size, size=count, p=zipf)
        for t in range(1, lengths.max()):
            draw = rng.random(count)[:, None]
            choice = np.minimum((draw > successor_cdf[words[:, t - 1]]).sum(1), 11)
            words[:, t] = successors[words[:, t - 1], choice]
        with open(os.path.join(out_dir, f"{split}.txt"), "w") as f:
            for sentence, length in zip(words, lengths):
                f.write(" ".join(f"w{w}" for w in sentence[:length]) + "\n")
    return out_dir


def check_data_dir(data):
    missing = [s for s in SPLITS if not os.path.isfile(os.path.join(data, f"{s}.txt"))]
    if missing:
        sys.exit(
            f"fairseq-rshare-demo: error: --data {data} lacks "
            + ", ".join(f"{s}.txt" for s in missing)
            + " (one tokenised sentence a line)"
        )


def run(command, log_path, prefix=None):
    """Run a fairseq CLI command, log everything, echo its progress lines; return the log text."""
    lines = []
    with open(log_path, "w") as log:
        log.write(" ".join(command) + "\n")
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        for line in process.stdout:
            log.write(line)
            lines.append(line)
            if prefix and "| train_inner |" in line:
                print(f"[{prefix}] {line.split('| train_inner |')[1].strip()}", flush=True)
        process.wait()
    if process.returncode:
        tail = "".join(lines[-15:])
        sys.exit(f"fairseq-rshare-demo: {command[0]} failed (log: {log_path}):\n{tail}")
    return "".join(lines)


def train_and_evaluate(name, model_flags, data_bin, work_dir, minutes, hidden):
    save_dir = os.path.join(work_dir, name)
    os.makedirs(save_dir, exist_ok=True)
    train_log = run(
        [
            "fairseq-train", data_bin, "--user-dir", USER_DIR, "--task", "language_modeling",
            "--arch", "rshare_lstm_lm", "--decoder-embed-dim", str(hidden),
            "--decoder-hidden-size", str(hidden), "--decoder-out-embed-dim", str(hidden),
            "--decoder-layers", "2", "--dropout", "0.2", "--optimizer", "adam", "--lr", "0.003",
            "--clip-norm", "0.5", "--max-tokens", "4096", "--tokens-per-sample", "64",
            "--sample-break-mode", "none", "--max-epoch", "50",
            "--stop-time-hours", str(minutes / 60), "--cpu", "--seed", "1",
            "--save-dir", save_dir, "--no-epoch-checkpoints", "--log-format", "simple",
            "--log-interval", "50", "--no-progress-bar", "--required-batch-size-multiple", "1",
            *model_flags,
        ],
        os.path.join(work_dir, f"{name}.train.log"),
        prefix=name,
    )
    # Words/s over the whole run: each epoch's wps weighted by its training time (the last epoch,
    # cut short by --stop-time-hours, may be a single update).
    epochs = [(float(wps), float(seconds)) for wps, seconds in re.findall(
        r"\| train \| epoch .*?\| wps ([\d.]+) .*?\| train_wall ([\d.]+)", train_log)]
    words_per_second = sum(wps * seconds for wps, seconds in epochs) / max(sum(s for _, s in epochs), 1e-9)
    checkpoint = os.path.join(save_dir, "checkpoint_best.pt")
    eval_log = run(
        [
            "fairseq-eval-lm", data_bin, "--user-dir", USER_DIR, "--path", checkpoint,
            "--gen-subset", "test", "--tokens-per-sample", "64", "--max-tokens", "4096", "--cpu",
            "--required-batch-size-multiple", "1",
        ],
        os.path.join(work_dir, f"{name}.eval.log"),
    )
    perplexity = float(re.findall(r"Perplexity: ([\d.]+)", eval_log)[-1])
    return {
        "name": name,
        "test_ppl": perplexity,
        "params": parameters_by_component(checkpoint),
        "checkpoint_bytes": os.path.getsize(checkpoint),
        "words_per_second": words_per_second,
    }


def format_table(results):
    header = ["model", "test ppl", "input params", "output params", "other params",
              "checkpoint bytes", "words/s"]
    rows = [
        [r["name"], f"{r['test_ppl']:.1f}", f"{r['params']['input']:,}",
         f"{r['params']['output']:,}", f"{r['params']['body']:,}",
         f"{r['checkpoint_bytes']:,}", f"{r['words_per_second']:,.0f}"]
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    lines = [" | ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in [header] + rows]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="folder with train.txt, valid.txt, test.txt (default: a generated corpus)")
    parser.add_argument("--work-dir", default="rshare-demo", help="where data, checkpoints and logs go")
    parser.add_argument("--minutes", type=float, default=2.0, help="training time of each model")
    parser.add_argument("--hidden", type=int, default=200, help="embedding and LSTM size")
    parser.add_argument("--ratio", type=float, default=0.05,
                        help="rshare table size as a fraction of the dense table (--rshare-ratio)")
    args = parser.parse_args(argv)
    if args.minutes <= 0:
        parser.error("--minutes must be positive")

    os.makedirs(args.work_dir, exist_ok=True)
    if args.data:
        check_data_dir(args.data)
        text_dir = args.data
    else:
        print("generating a corpus (random Zipfian bigram language) ...", flush=True)
        text_dir = make_corpus(os.path.join(args.work_dir, "corpus"))
    data_bin = os.path.join(args.work_dir, "data-bin")
    print(f"fairseq-preprocess {text_dir} -> {data_bin}", flush=True)
    run(
        ["fairseq-preprocess", "--only-source", "--destdir", data_bin, "--workers", "2",
         *[f"--{s}pref={os.path.join(text_dir, s + '.txt')}" for s in SPLITS]],
        os.path.join(args.work_dir, "preprocess.log"),
    )
    started = time.time()
    results = []
    for name, flags in [
        ("dense", ["--rshare-tables", "none"]),
        ("rshare", ["--rshare-ratio", str(args.ratio), "--rshare-subvectors", "8",
                    "--criterion", "rshare_cross_entropy"]),
    ]:
        print(f"training {name} for {args.minutes:g} min ...", flush=True)
        results.append(train_and_evaluate(name, flags, data_bin, args.work_dir, args.minutes, args.hidden))
    print()
    print(format_table(results))
    print(f"\n(total {time.time() - started:.0f} s; logs and checkpoints in {args.work_dir})")


if __name__ == "__main__":
    main()
