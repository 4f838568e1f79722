"""Run fairseq's command-line tools with the fairseq of the running Python, whatever PATH says,
and read their logs.

A virtualenv need not be activated: its console scripts sit beside its Python
(``sys.executable``), so that is where they are looked for.  Where they are not (an install
without console scripts), the tool runs as a module, ``python -m fairseq_cli.<tool>``; the
script is preferred because ``-m`` would also import a ``fairseq`` folder from the working
directory (a fairseq checkout) instead of the installed one.
"""
import os
import re
import sys


def fairseq_tool(name):
    """The command (a list) that runs fairseq tool ``name``, e.g. ``"fairseq-train"``
    (``python -m fairseq_cli.train`` where no script sits beside the Python)."""
    script = os.path.join(os.path.dirname(sys.executable), name)
    if os.path.isfile(script):
        return [script]
    return [sys.executable, "-m", "fairseq_cli." + name[len("fairseq-"):].replace("-", "_")]


def environment_with_tools(environment=None):
    """A copy of `environment` (os.environ) whose PATH starts with the running Python's
    scripts, for a shell script (a recipe) that calls fairseq's tools by name."""
    environment = dict(os.environ if environment is None else environment)
    environment["PATH"] = os.path.dirname(sys.executable) + os.pathsep + environment.get("PATH", "")
    return environment


def eval_lm_perplexity(eval_log):
    """The perplexity fairseq-eval-lm reports last in its log text, or None."""
    found = re.findall(r"Perplexity: ([\d.,]+)", eval_log)
    return float(found[-1].replace(",", "")) if found else None


def training_speed(train_log):
    """(updates, words/s) of a whole fairseq-train run, from its log text's end-of-epoch lines: each
    epoch's words (words per batch x its updates) over its time (its words / its wps)."""
    updates, words, seconds = 0, 0.0, 0.0
    for wps, wpb, total in re.findall(
            r"\| train \| epoch .*?\| wps ([\d.]+) .*?\| wpb ([\d.]+) .*?\| num_updates (\d+)", train_log):
        if int(total) <= updates or not float(wps):
            continue  # an epoch that resumed at its end: no update, no speed
        epoch_words = float(wpb) * (int(total) - updates)
        updates, words, seconds = int(total), words + epoch_words, seconds + epoch_words / float(wps)
    return updates, words / max(seconds, 1e-9)
