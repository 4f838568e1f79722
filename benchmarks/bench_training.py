"""Whole fairseq training, dense against rshare: words/s, peak RSS, checkpoint bytes, and the
evaluation speed of the saved checkpoint (fairseq-eval-lm, or beam-5 fairseq-generate).

    python benchmarks/bench_training.py             # every case, ~45 min on 2 cores
    python benchmarks/bench_training.py --smoke     # tiny sizes, a minute (what CI runs)

Every run is a real `fairseq-train` process (words/s from fairseq's own log, over the whole
run and steady: after its first 10 updates, which hold the start-up and auto's one-off timing;
peak RSS of that process, the size of the checkpoint it saves), repeated with the variants
interleaved; figures are medians and ratios are rshare over dense from the same run.  Cases:
- LSTM LMs on PTB- and WikiText-2-shaped data (V=10k and 33k, 2x200, synthetic Zipfian ids):
  dense, rshare at 1 % (rshare runs train with --criterion rshare_cross_entropy, dense ones with
  fairseq's own; the output path `auto`, measured at the first step), at V=10k the LM recipe's
  rshare (10 %, output bias), and two regimes of the output path (2000 and 200 pool entries per
  position: each path forced, and auto);
- the transformer NMT on Multi30k de-en (needs ../shared/data/multi30k; prepared with
  recipes/translation.sh), dense against rshare at 10 %;
- a One-Billion-Word-sized LSTM LM (V=800k, H=1024, one layer), a few updates: rshare, and
  dense under an address-space cap that keeps the shared machine safe.
Writes benchmarks/results/training.json and .md (a --case run replaces only its own cases).
"""
import argparse
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import tempfile
import time

import numpy as np

from bench_layers import save_results

from fairseq_rshare.tools import environment_with_tools, fairseq_tool, training_speed

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
USER_DIR = os.path.join(REPO, "fairseq_rshare")
RESULTS = os.path.join(HERE, "results")
MULTI30K = os.environ.get("RSHARE_DATA", os.path.join(REPO, "..", "shared", "data")) + "/multi30k"


def synthetic_lm_data(folder, vocabulary, tokens, valid_tokens, seed=0):
    """A fairseq data-bin of Zipfian token ids whose dictionary holds exactly `vocabulary` words."""
    rng = np.random.default_rng(seed)
    zipf = 1.0 / np.arange(1, vocabulary + 1)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "dict.src"), "w") as f:
        f.writelines(f"w{i} {vocabulary - i}\n" for i in range(vocabulary))
    for split, count in (("train", tokens), ("valid", valid_tokens)):
        ids = rng.choice(vocabulary, size=count, p=zipf / zipf.sum())
        with open(os.path.join(folder, f"{split}.txt"), "w") as f:
            for line in np.array_split(ids, max(1, count // 35)):
                f.write(" ".join(f"w{i}" for i in line) + "\n")
    subprocess.run(
        [*fairseq_tool("fairseq-preprocess"), "--only-source", "--srcdict", os.path.join(folder, "dict.src"),
         "--trainpref", os.path.join(folder, "train.txt"), "--validpref", os.path.join(folder, "valid.txt"),
         "--destdir", os.path.join(folder, "bin"), "--workers", "2"],
        check=True, capture_output=True,
    )
    return os.path.join(folder, "bin")


def multi30k_data(folder):
    """Multi30k de-en through recipes/translation.sh's prepare step (sentencepiece, 8k joint)."""
    subprocess.run(
        ["bash", os.path.join(REPO, "recipes", "translation.sh")], check=True, capture_output=True,
        env={**environment_with_tools(), "STEPS": "prepare", "DATA": MULTI30K, "WORK": folder},
    )
    return os.path.join(folder, "data-bin")


def evaluation_speed(kind, data_bin, save_dir, extra=()):
    """Speed of the trained checkpoint: fairseq-eval-lm tokens/s (kind "lm") or beam-5
    fairseq-generate sentences/s and tokens/s on the test set (kind "nmt"); `extra`: more flags
    for the tool."""
    checkpoint = os.path.join(save_dir, "checkpoint_last.pt")
    common = [data_bin, "--user-dir", USER_DIR, "--cpu", "--path", checkpoint, *extra]
    if kind == "lm":
        command = [*fairseq_tool("fairseq-eval-lm"), *common, "--gen-subset", "valid", "--tokens-per-sample", "35",
                   "--max-tokens", "2240", "--required-batch-size-multiple", "1"]
        pattern, keys = r"Evaluated [\d,]+ tokens in [\d.]+s \(([\d.]+) tokens/s\)", ("eval_tokens_per_second",)
    else:
        command = [*fairseq_tool("fairseq-generate"), *common, "--gen-subset", "test", "--beam", "5", "--batch-size", "64",
                   "--max-len-a", "1.2", "--max-len-b", "10", "--source-lang", "de", "--target-lang", "en"]
        pattern = r"\(([\d.]+) sentences/s, ([\d.]+) tokens/s\)"
        keys = ("generate_sentences_per_second", "generate_tokens_per_second")
    process = subprocess.run(command, capture_output=True, text=True)
    found = re.findall(pattern, process.stdout + process.stderr)
    if not found:
        return {"evaluation_error": f"{os.path.basename(command[0])} printed no speed"}
    values = found[-1] if isinstance(found[-1], tuple) else (found[-1],)
    return dict(zip(keys, map(float, values)))


def train(data_bin, flags, save_dir, memory_cap_gb=None, evaluate=None, keep_checkpoint=False):
    """One fairseq-train process: its words/s, peak RSS and checkpoint bytes (None when it failed),
    then evaluation_speed(evaluate, ...) of its checkpoint when evaluate is "lm" or "nmt"; the
    save_dir is removed afterwards unless keep_checkpoint."""
    shutil.rmtree(save_dir, ignore_errors=True)
    command = [*fairseq_tool("fairseq-train"), data_bin, "--user-dir", USER_DIR, "--cpu", "--seed", "1",
               "--required-batch-size-multiple", "1", "--disable-validation", "--save-dir", save_dir,
               "--no-epoch-checkpoints", "--log-format", "simple", "--no-progress-bar", *flags]
    cap = None
    if memory_cap_gb:
        cap = int(memory_cap_gb * 2**30)
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=(lambda: resource.setrlimit(resource.RLIMIT_AS, (cap, cap))) if cap else None,
        )
        _, status, usage = os.wait4(process.pid, 0)
        log.seek(0)
        text = log.read()
    result = {"peak_rss_mb": round(usage.ru_maxrss / 1024), "ok": status == 0}
    updates, words_per_second = training_speed(text)
    checkpoint = os.path.join(save_dir, "checkpoint_last.pt")
    if status == 0 and updates and os.path.exists(checkpoint):
        result.update(words_per_second=words_per_second, checkpoint_bytes=os.path.getsize(checkpoint))
        steady = steady_training_speed(text)
        if steady:
            result["steady_words_per_second"] = steady
        if evaluate:
            result.update(evaluation_speed(evaluate, data_bin, save_dir))
    elif "can't allocate memory" in text or "MemoryError" in text:
        result.update(ok=False, error=f"out of memory under the {memory_cap_gb} GB address-space cap")
    else:
        result["ok"] = False
        result["error"] = next(
            (line.strip()[:160] for line in reversed(text.splitlines())
             if "Error" in line or "error" in line or "memory" in line), f"exit status {status}")
    if not keep_checkpoint:
        shutil.rmtree(save_dir, ignore_errors=True)
    return result


# fairseq logs words/s every LOG_INTERVAL updates; the steady speed leaves out the first interval,
# which holds the start-up and auto's one-off timing of the two output paths.
LOG_INTERVAL = 10


def steady_intervals(train_log):
    """(updates, words, seconds) of a fairseq-train log's intervals after its first LOG_INTERVAL
    updates, from its train_inner lines (each interval's words / its wps)."""
    updates = words = seconds = 0.0
    previous = None
    for wps, wpb, total in re.findall(r"train_inner \| .*?wps=([\d.]+), .*?wpb=([\d.]+), .*?num_updates=(\d+)", train_log):
        if previous is not None and previous >= LOG_INTERVAL and float(wps):
            interval_words = float(wpb) * (int(total) - previous)
            updates += int(total) - previous
            words, seconds = words + interval_words, seconds + interval_words / float(wps)
        previous = int(total)
    return updates, words, seconds


def steady_training_speed(train_log):
    """Words/s after the first LOG_INTERVAL updates (steady_intervals), or None for a shorter run."""
    _, words, seconds = steady_intervals(train_log)
    return words / seconds if seconds else None


def lm_flags(hidden, layers, updates, max_tokens, variant_flags):
    return ["--task", "language_modeling", "--arch", "rshare_lstm_lm", "--decoder-layers", str(layers),
            "--decoder-embed-dim", str(hidden), "--decoder-hidden-size", str(hidden),
            "--decoder-out-embed-dim", str(hidden), "--optimizer", "adam", "--lr", "0.003",
            "--clip-norm", "0.5", "--tokens-per-sample", "35", "--sample-break-mode", "none",
            "--max-tokens", str(max_tokens), "--max-update", str(updates), "--log-interval", str(LOG_INTERVAL),
            *variant_flags]


def nmt_flags(updates, variant_flags):
    return ["--task", "translation", "--source-lang", "de", "--target-lang", "en",
            "--arch", "rshare_transformer", "--encoder-layers", "3", "--decoder-layers", "3",
            "--encoder-embed-dim", "256", "--decoder-embed-dim", "256", "--encoder-ffn-embed-dim", "1024",
            "--decoder-ffn-embed-dim", "1024", "--encoder-attention-heads", "4",
            "--decoder-attention-heads", "4", "--share-all-embeddings", "--optimizer", "adam",
            "--lr", "0.0005", "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
            "--max-tokens", "4096", "--max-update", str(updates), "--log-interval", str(LOG_INTERVAL),
            *variant_flags]


DENSE = ["--rshare-tables", "none"]
RSHARE = ["--criterion", "rshare_cross_entropy"]  # the loss from the pool scores (see README)


def cases(smoke, work, wanted=lambda name: True):
    """(name, data_bin, variants {name: flags}, memory cap GB or None, evaluation kind or None)
    for every wanted case."""
    updates = 2 * LOG_INTERVAL + 5 if smoke else 40  # smoke: enough for a steady interval
    shapes = [("PTB shape (V=10k, 2x200)", 10_000), ("WikiText-2 shape (V=33k, 2x200)", 33_278)]
    if smoke:
        shapes = [("smoke shape (V=2k, 2x32)", 2_000)]
    hidden = 32 if smoke else 200
    for index, (name, vocabulary) in enumerate(shapes):
        if not wanted(name):
            continue
        # Evaluated on a PTB-test-sized stream (82k tokens), where a one-off cost such as auto's
        # timing of the output paths weighs as it does on real data.
        data = synthetic_lm_data(os.path.join(work, f"lm{vocabulary}"), vocabulary, 2240 * updates + 5000,
                                 2000 if smoke else 82_000)
        variants = {"dense": DENSE, "rshare 1 %": ["--rshare-ratio", "0.01", *RSHARE]}
        if index == 0:
            variants["rshare 10 %, bias (LM recipe)"] = ["--rshare-ratio", "0.1", "--rshare-output-bias", *RSHARE]
            for per_position in (2000, 200) if not smoke else (20,):
                for path in ("pool-scores", "materialize", "auto"):
                    variants[f"rshare {per_position}/position, {path}"] = [
                        "--rshare-pool-size", str(8 * per_position), "--rshare-output-path", path, *RSHARE]
        yield name, data, {v: lm_flags(hidden, 2, updates, 2240, f) for v, f in variants.items()}, None, "lm"
    if os.path.isdir(MULTI30K) and not smoke and wanted("Multi30k"):
        data = multi30k_data(os.path.join(work, "multi30k"))
        yield "Multi30k transformer (3+3x256, V=8k)", data, {
            "dense": nmt_flags(30, DENSE), "rshare 10 %": nmt_flags(30, ["--rshare-ratio", "0.1", *RSHARE])}, None, "nmt"
    vocabulary, hidden, cap = (800_000, 1024, 16) if not smoke else (20_000, 64, 4)
    if not wanted("1BW-sized"):
        return
    data = synthetic_lm_data(os.path.join(work, "lm-big"), vocabulary, 256 * 4, 2000)
    yield f"1BW-sized LSTM LM (V={vocabulary:,}, 1x{hidden}), memory", data, {
        "dense": lm_flags(hidden, 1, 3, 256, DENSE),
        "rshare 1 %": lm_flags(hidden, 1, 3, 256, ["--rshare-ratio", "0.01", *RSHARE])}, cap, None


def markdown(rows, meta):
    lines = [
        f"Measured on {meta['machine']}, torch {meta['torch']}; median of "
        f"{meta['repeats']} interleaved runs (memory case: one run each); each case's date beside it.",
        "",
        "Evaluation: fairseq-eval-lm tokens/s (LMs), beam-5 fairseq-generate sentences/s (NMT), "
        "of the checkpoint each run saved. Steady: words/s after the first "
        f"{LOG_INTERVAL} updates (start-up and auto's one-off timing left out).",
        "",
        "| case | run | words/s | speed vs dense | steady words/s | steady vs dense | peak RSS MB "
        "| checkpoint MB | checkpoint vs dense | evaluation | evaluation vs dense |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        dense = row["runs"]["dense"]
        case = f"{row['case']}, {row['date']}"
        for variant, run in row["runs"].items():
            if not run["ok"]:
                lines.append(f"| {case} | {variant} | failed: {run['error']} | | | | {run['peak_rss_mb']:,} | | | | |")
                continue
            speed = size = evaluation_ratio = steady_ratio = "–"
            steady = f"{run['steady_words_per_second']:,.0f}" if "steady_words_per_second" in run else "–"
            evaluation = next((f"{run[key]:,.1f} {unit}" for key, unit in EVALUATION_SPEEDS.items() if key in run), "–")
            if dense["ok"] and variant != "dense":
                speed = f"{run['words_per_second'] / dense['words_per_second']:.2f}×"
                if "steady_words_per_second" in run and "steady_words_per_second" in dense:
                    steady_ratio = f"{run['steady_words_per_second'] / dense['steady_words_per_second']:.2f}×"
                size = f"{dense['checkpoint_bytes'] / run['checkpoint_bytes']:.1f}× smaller"
                evaluation_ratio = next((f"{run[key] / dense[key]:.2f}×" for key in EVALUATION_SPEEDS
                                         if key in run and key in dense), "–")
            lines.append(
                f"| {case} | {variant} | {run['words_per_second']:,.0f} | {speed} | {steady} | {steady_ratio} "
                f"| {run['peak_rss_mb']:,} | {run['checkpoint_bytes'] / 1e6:.1f} | {size} "
                f"| {evaluation} | {evaluation_ratio} |")
    return "\n".join(lines) + "\n"


EVALUATION_SPEEDS = {"eval_tokens_per_second": "tokens/s", "generate_sentences_per_second": "sentences/s"}


def median_run(runs):
    ok = [r for r in runs if r["ok"]]
    if not ok:
        return runs[-1]
    middle = sorted(ok, key=lambda r: r["words_per_second"])[len(ok) // 2]
    speeds = {key: statistics.median(r[key] for r in ok if key in r)
              for key in ("words_per_second", "steady_words_per_second", *EVALUATION_SPEEDS,
                          "generate_tokens_per_second")
              if any(key in r for r in ok)}
    return {**middle, **speeds, "peak_rss_mb": max(r["peak_rss_mb"] for r in ok)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the benchmark runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=RESULTS, help="folder for training.json and training.md")
    parser.add_argument("--case", action="append",
                        help="run only the cases whose name contains this (PTB, WikiText-2, Multi30k, 1BW); repeatable")
    args = parser.parse_args()
    repeats = 1 if args.smoke else args.repeats
    rows = []
    with tempfile.TemporaryDirectory() as work:
        def wanted(name):
            return not args.case or any(part in name for part in args.case)

        for case, data, variants, cap, evaluate in cases(args.smoke, work, wanted):
            runs = {variant: [] for variant in variants}
            for _ in range(1 if cap else repeats):
                for variant, flags in variants.items():
                    runs[variant].append(train(data, flags, os.path.join(work, "save"), cap, evaluate))
            row = {"case": case, "date": time.strftime("%Y-%m-%d"), "runs": {v: median_run(r) for v, r in runs.items()}}
            for variant, run in row["runs"].items():
                print(f"{case} | {variant}: " + (f"{run['words_per_second']:,.0f} words/s" if run["ok"]
                      else f"failed ({run['error']})") + f", peak RSS {run['peak_rss_mb']:,} MB", flush=True)
            rows.append(row)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "torch": __import__("torch").__version__, "repeats": repeats}
    if args.case:
        rows = with_earlier_cases(args.out, rows)
    save_results(args.out, "training", meta, rows, markdown(rows, meta))


def with_earlier_cases(folder, rows):
    """rows, after the rows of other cases already in folder/training.json (a --case run
    replaces its own cases and keeps the rest)."""
    path = os.path.join(folder, "training.json")
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        earlier = json.load(f)["rows"]
    measured = {row["case"] for row in rows}
    return [row for row in earlier if row["case"] not in measured] + rows


if __name__ == "__main__":
    main()
