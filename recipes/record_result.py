"""Write one run's results JSON from its fairseq logs and checkpoint (called by the recipes).

The JSON is written to a temporary file and renamed, so a run that fails on the way never
leaves a file that looks complete.
"""
import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys

import torch

from fairseq_rshare.checkpoints import parameters_by_component
from fairseq_rshare.tools import eval_lm_perplexity
from fairseq_rshare.tools import training_speed as words_per_second_of_run


def fail(message):
    sys.exit(f"record_result: error: {message}")


def last_match(pattern, text, what, path):
    found = re.findall(pattern, text)
    if not found:
        fail(f"{path} has no {what}: did that step finish? (see the log)")
    return found[-1]


def number(text):
    return float(text.replace(",", ""))


def training_speed(train_log):
    """Words/s over the whole run: fairseq's per-epoch wps, weighted by each epoch's words."""
    with open(train_log) as f:
        updates, words_per_second = words_per_second_of_run(f.read())
    if not updates:
        fail(f"{train_log} has no end-of-epoch training line: did training finish? (see the log)")
    return {"words_per_second": round(words_per_second, 1), "updates": updates}


# What a running fairseq-train logs from; the lines a starting one logs before its config line
# (import-time notices such as fairseq's tensorboardX hint) come from other modules.
TRAINING_SOURCES = re.compile(
    r"train_inner|train|valid|fairseq_cli\..+|fairseq\.(trainer|checkpoint_utils|data\..+)")


def training_seconds(train_log):
    """Wall time of training, from its log: each fairseq-train start in it (a run resumed after a
    stop appends another) to that start's last line logged by the training itself, summed. A
    segment stopped on the way counts too, all but the time after its last logged line."""
    with open(train_log) as f:
        lines = re.findall(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) \| \w+ \| (\S+) \| (.)", f.read(), re.M)
    seconds, start, last = 0.0, None, None
    for stamp, source, first_character in lines:
        moment = datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S")
        if source == "fairseq_cli.train" and first_character == "{":  # fairseq-train logs its config first
            if start is not None:
                seconds += (last - start).total_seconds()
            start = last = moment
        elif start is not None and TRAINING_SOURCES.fullmatch(source):
            last = moment
    if start is None:
        fail(f"{train_log} has no fairseq-train start (its config line): is it a fairseq-train log?")
    return seconds + (last - start).total_seconds()


def validation_curve(train_log):
    """[[updates, validation perplexity], ...] of every validation in the log, in order."""
    with open(train_log) as f:
        found = re.findall(r"\| valid on .*?\| ppl ([\d.,]+) .*?\| num_updates (\d+)", f.read())
    return [[int(updates), number(ppl)] for ppl, updates in found]


def training_seed(command):
    """The --seed a fairseq-train command sets (its last one), fairseq's default 1 without one."""
    found = re.findall(r"--seed[ =](\d+)", command)
    return int(found[-1]) if found else 1


def teacher_of(teacher_result):
    """What a run that started from (or distilled) its teacher owes it: the teacher's variant,
    score, updates, training time and parameters by table."""
    if teacher_result is None:
        return {}
    with open(teacher_result) as f:
        teacher = json.load(f)
    score = {key: teacher[key] for key in ("test_ppl", "test_bleu") if key in teacher}
    return {"teacher": {"variant": teacher["variant"], **score, "updates": teacher["updates"],
                        "train_seconds": teacher["train_seconds"],
                        "params": teacher["params"]}}


def compression_report(compress_log, seconds):
    """What fairseq-rshare-compress reported for a run that started compressed: each table's
    relative reconstruction error, and the validation perplexity of the teacher and of the
    compressed model before any fine-tuning (when it was given the data); its wall time."""
    if compress_log is None:
        return {}
    with open(compress_log) as f:
        text = f.read()
    errors = re.findall(r"^(.+?): V=\d+ .*; relative error ([\d.]+)$", text, re.MULTILINE)
    if not errors:
        fail(f"{compress_log} names no fitted table: did fairseq-rshare-compress finish? (see the log)")
    report = {"relative_errors": {table: float(error) for table, error in errors}}
    for model, key in (("dense", "teacher_valid_ppl"), ("compressed", "valid_ppl")):
        found = re.findall(rf"validation \({model}, before fine-tuning\): .*perplexity ([\d.]+)", text)
        if found:
            report[key] = float(found[-1])
    if seconds is not None:
        report["seconds"] = seconds
    return {"compressed": report}


def perplexity(eval_log):
    with open(eval_log) as f:
        text = f.read()
    return {
        "test_ppl": eval_lm_perplexity(text) or fail(f"{eval_log} has no perplexity: did that step finish? (see the log)"),
        "eval_tokens_per_second": number(
            last_match(r"\(([\d.,]+) tokens/s\)", text, "evaluation speed", eval_log)
        ),
    }


def bleu(generate_log, sacrebleu_json):
    with open(generate_log) as f:
        text = f.read()
    with open(sacrebleu_json) as f:
        try:
            score = json.load(f)
        except json.JSONDecodeError:
            fail(f"{sacrebleu_json} is not sacrebleu's JSON output")
    return {
        "test_bleu": score["score"],
        "sacrebleu_signature": score["signature"],
        "generate_sentences_per_second": number(
            last_match(r"\(([\d.,]+) sentences/s", text, "generation speed", generate_log)
        ),
    }


def git_revision():
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
            cwd=os.path.dirname(os.path.abspath(__file__)), check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine():
    """The processor, CPU count, torch version and the GPU where there is one."""
    where = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    if torch.cuda.is_available():
        where += f", {torch.cuda.get_device_name()}"
    return where


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="the results JSON to write")
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--preset", required=True)
    parser.add_argument("--variant", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--train-log", required=True)
    parser.add_argument("--command-file", required=True, help="file holding the fairseq-train command")
    parser.add_argument("--eval-log", help="fairseq-eval-lm log (language models)")
    parser.add_argument("--generate-log", help="fairseq-generate log (translation)")
    parser.add_argument("--sacrebleu-json", help="sacrebleu's JSON output (translation)")
    parser.add_argument("--stage", default="scratch", help="how the run started (recipes/variants.py's stage)")
    parser.add_argument("--teacher-result", help="the results JSON of the dense run it started from or distilled")
    parser.add_argument("--compress-log", help="fairseq-rshare-compress's output, for a run that started compressed")
    parser.add_argument("--compress-seconds", type=float, help="the compression's wall time")
    parser.add_argument("--vocabulary", required=True, help="what the vocabulary is, in words (recorded as given)")
    args = parser.parse_args(argv)
    for path in (args.checkpoint, args.train_log, args.command_file, args.eval_log,
                 args.generate_log, args.sacrebleu_json, args.teacher_result, args.compress_log):
        if path is not None and not os.path.isfile(path):
            fail(f"{path} does not exist: did the step that writes it finish?")

    if args.eval_log:
        metric = perplexity(args.eval_log)
    elif args.generate_log and args.sacrebleu_json:
        metric = bleu(args.generate_log, args.sacrebleu_json)
    else:
        fail("give --eval-log, or --generate-log and --sacrebleu-json")
    params = parameters_by_component(args.checkpoint)
    with open(args.command_file) as f:
        command = f.read().strip()
    result = {
        "corpus": args.corpus,
        "preset": args.preset,
        "variant": args.variant,
        "seed": training_seed(command),
        "vocabulary": args.vocabulary,
        **metric,
        "params": params,
        "embedding_softmax_params": params["input"] + params["output"],
        "checkpoint_bytes": os.path.getsize(args.checkpoint),
        "train_seconds": training_seconds(args.train_log),
        **training_speed(args.train_log),
        "valid_curve": validation_curve(args.train_log),
        "command": command,
        "stage": args.stage,
        **teacher_of(args.teacher_result),
        **compression_report(args.compress_log, args.compress_seconds),
        "git_revision": git_revision(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
    }
    temporary = args.out + ".partial"
    with open(temporary, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    os.replace(temporary, args.out)
    print(f"wrote {args.out}: " + ", ".join(
        f"{key} {result[key]}" for key in ("test_ppl", "test_bleu", "embedding_softmax_params",
                                           "words_per_second") if key in result))


if __name__ == "__main__":
    main()
