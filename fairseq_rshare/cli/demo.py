"""fairseq-rshare-demo: train a dense and an rshare LSTM LM side by side and compare them.

Everything runs through the stock fairseq command-line tools (preprocess, train, eval-lm), the
ones installed beside the running Python.  Both models train for the same number of updates, so
their test perplexities compare at equal training and do not depend on the machine's speed;
words/s is reported apart.
Without --data it trains on a small corpus it generates itself (a random Zipfian bigram
language), so it runs offline on any machine; --data DIR takes train.txt, valid.txt and
test.txt (one tokenised sentence a line), e.g. Mikolov's PTB.
"""
import argparse
import os
import subprocess
import sys
import time

import numpy as np

from ..checkpoints import parameters_by_component
from ..kernels import extension
from ..tools import eval_lm_perplexity, fairseq_tool, training_speed

USER_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the fairseq_rshare package
SPLITS = ("train", "valid", "test")
# Updates of each model: about 2 minutes each on 2 idle cores (~2 epochs of the generated corpus).
MAX_UPDATE = 200


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


def run(tool, args, log_path, prefix=None):
    """Run fairseq tool ``tool`` (e.g. "fairseq-train") on ``args``, log everything, echo its
    progress lines; return the log text."""
    command = fairseq_tool(tool) + args
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
        sys.exit(f"fairseq-rshare-demo: {tool} failed (log: {log_path}):\n{tail}")
    return "".join(lines)


def train_and_evaluate(name, model_flags, data_bin, work_dir, max_update, hidden, seed):
    save_dir = os.path.join(work_dir, name)
    os.makedirs(save_dir, exist_ok=True)
    train_log = run(
        "fairseq-train",
        [
            data_bin, "--user-dir", USER_DIR, "--task", "language_modeling",
            "--arch", "rshare_lstm_lm", "--decoder-embed-dim", str(hidden),
            "--decoder-hidden-size", str(hidden), "--decoder-out-embed-dim", str(hidden),
            "--decoder-layers", "2", "--dropout", "0.2", "--optimizer", "adam", "--lr", "0.003",
            "--clip-norm", "0.5", "--max-tokens", "4096", "--tokens-per-sample", "64",
            "--sample-break-mode", "none", "--max-update", str(max_update), "--disable-validation",
            "--cpu", "--seed", str(seed), "--save-dir", save_dir, "--no-epoch-checkpoints",
            "--log-format", "simple", "--log-interval", "50", "--no-progress-bar",
            "--required-batch-size-multiple", "1", *model_flags,
        ],
        os.path.join(work_dir, f"{name}.train.log"),
        prefix=name,
    )
    updates, words_per_second = training_speed(train_log)
    checkpoint = os.path.join(save_dir, "checkpoint_last.pt")  # the model after exactly max_update updates
    eval_log = run(
        "fairseq-eval-lm",
        [
            data_bin, "--user-dir", USER_DIR, "--path", checkpoint,
            "--gen-subset", "test", "--tokens-per-sample", "64", "--max-tokens", "4096", "--cpu",
            "--required-batch-size-multiple", "1",
        ],
        os.path.join(work_dir, f"{name}.eval.log"),
    )
    perplexity = eval_lm_perplexity(eval_log)
    return {
        "name": name,
        "updates": updates,
        "test_ppl": perplexity,
        "params": parameters_by_component(checkpoint),
        "checkpoint_bytes": os.path.getsize(checkpoint),
        "words_per_second": words_per_second,
    }


def format_table(results):
    """Quality columns (parameters, checkpoint, test perplexity), then speed (words/s, and its
    ratio to the first row's)."""
    header = ["model", "updates", "input params", "output params", "other params",
              "checkpoint bytes", "test ppl", "words/s", "speed"]
    rows = [
        [r["name"], str(r["updates"]), f"{r['params']['input']:,}", f"{r['params']['output']:,}",
         f"{r['params']['body']:,}", f"{r['checkpoint_bytes']:,}", f"{r['test_ppl']:.2f}",
         f"{r['words_per_second']:,.0f}", f"{r['words_per_second'] / results[0]['words_per_second']:.2f}x"]
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    lines = [" | ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in [header] + rows]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(lines)


def verdict(dense, rshare):
    better, worse = sorted([dense, rshare], key=lambda r: r["test_ppl"])
    speed = rshare["words_per_second"] / dense["words_per_second"]
    return (
        f"Quality, after {rshare['updates']} updates each (fixed by --seed, whatever the machine's speed): "
        f"{better['name']} has the lower test perplexity, {better['test_ppl']:.2f} against {worse['test_ppl']:.2f}.\n"
        f"Speed, words/s over each whole training run (varies with the machine and its load): "
        f"rshare trained {speed:.2f}x as fast as dense."
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="folder with train.txt, valid.txt, test.txt (default: a generated corpus)")
    parser.add_argument("--work-dir", default="rshare-demo", help="where data, checkpoints and logs go")
    parser.add_argument("--max-update", type=int, default=MAX_UPDATE,
                        help="training updates of each model (4096 tokens each)")
    parser.add_argument("--hidden", type=int, default=200, help="embedding and LSTM size")
    parser.add_argument("--ratio", type=float, default=0.05,
                        help="rshare table size as a fraction of the dense table (--rshare-ratio)")
    parser.add_argument("--seed", type=int, default=1, help="fairseq-train --seed of both models")
    args = parser.parse_args(argv)
    if args.max_update <= 0:
        parser.error("--max-update must be positive")

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
        "fairseq-preprocess",
        ["--only-source", "--destdir", data_bin, "--workers", "2",
         *[f"--{s}pref={os.path.join(text_dir, s + '.txt')}" for s in SPLITS]],
        os.path.join(args.work_dir, "preprocess.log"),
    )
    # Build the fused kernels here, before anything is timed (a first build says so on stderr),
    # so that rshare's training only loads them.
    if extension() is None:
        print("the fused CPU kernels are unavailable: rshare trains on stock ops", flush=True)
    started = time.time()
    results = []
    for name, flags in [
        ("dense", ["--rshare-tables", "none"]),
        ("rshare", ["--rshare-ratio", str(args.ratio), "--rshare-subvectors", "8",
                    "--criterion", "rshare_cross_entropy"]),
    ]:
        print(f"training {name} for {args.max_update} updates ...", flush=True)
        results.append(train_and_evaluate(name, flags, data_bin, args.work_dir, args.max_update, args.hidden,
                                          args.seed))
    print()
    print(format_table(results))
    print()
    print(verdict(*results))
    print(f"\n(total {time.time() - started:.0f} s; logs and checkpoints in {args.work_dir})")


if __name__ == "__main__":
    main()
