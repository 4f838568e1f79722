"""Write the tiny checkpoints that tests/test_old_checkpoints.py loads: one of each model family,
trained for two updates on a slice of the real corpora, with the log-probabilities each gives on
a fixed batch.  Run once, by the release whose checkpoints later releases must keep loading:

    python3 tests/data/old_checkpoints/make.py ../shared/data tests/data/old_checkpoints
"""
import os
import shutil
import subprocess
import sys
import tempfile

import torch
from fairseq import checkpoint_utils

import fairseq_rshare
from fairseq_rshare.tools import fairseq_tool

USER_DIR = os.path.dirname(fairseq_rshare.__file__)
COMMON = ["--user-dir", USER_DIR, "--cpu", "--max-update", "2", "--optimizer", "adam", "--lr", "0.01",
          "--required-batch-size-multiple", "1", "--no-save-optimizer-state", "--no-epoch-checkpoints",
          "--seed", "1", "--criterion", "rshare_cross_entropy"]
TINY_LM = ["--decoder-layers", "1", "--decoder-embed-dim", "16"]
TINY_NMT = ["--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "16", "--decoder-embed-dim", "16"]
FAMILIES = {
    "lstm_lm": ("lm", ["--task", "stateful_lm", "--arch", "rshare_lstm_lm", *TINY_LM, "--decoder-hidden-size", "16",
                       "--decoder-out-embed-dim", "16",
                       "--rshare-ratio", "0.25", "--rshare-subvectors", "4", "--rshare-output-bias",
                       "--batch-size", "4", "--tokens-per-sample", "8"]),
    "transformer_lm": ("lm", ["--task", "language_modeling", "--arch", "rshare_transformer_lm", *TINY_LM,
                              "--decoder-output-dim", "16", "--decoder-input-dim", "16",
                              "--decoder-ffn-embed-dim", "32", "--decoder-attention-heads", "2",
                              "--rshare-ratio", "0.25", "--rshare-subvectors", "4", "--share-decoder-input-output-embed",
                              "--batch-size", "4", "--tokens-per-sample", "16"]),
    "lstm": ("nmt", ["--task", "translation", "--source-lang", "de", "--target-lang", "en", "--arch", "rshare_lstm", *TINY_NMT, "--encoder-hidden-size", "16",
                     "--decoder-hidden-size", "16", "--decoder-out-embed-dim", "16", "--rshare-ratio", "0.25",
                     "--rshare-subvectors", "4", "--rshare-pool-kind", "global", "--max-tokens", "400"]),
    "transformer": ("nmt", ["--task", "translation", "--source-lang", "de", "--target-lang", "en", "--arch", "rshare_transformer", *TINY_NMT,
                            "--encoder-ffn-embed-dim", "32", "--decoder-ffn-embed-dim", "32",
                            "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
                            "--share-all-embeddings", "--rshare-ratio", "0.25", "--rshare-subvectors", "4",
                            "--rshare-word-scale", "--max-tokens", "400"]),
}


def run(*command):
    result = subprocess.run([*map(str, command)], capture_output=True, text=True)
    if result.returncode:
        sys.exit(result.stderr[-3000:])


def head(source, destination, lines):
    with open(source) as f:
        text = "".join(line for _, line in zip(range(lines), f))
    with open(destination, "w") as f:
        f.write(text)


def prepare(shared, work, out):
    for split in ("train", "valid"):
        head(os.path.join(shared, "ptb", f"{split}.txt"), os.path.join(work, f"lm.{split}"), 200)
        for lang in ("de", "en"):
            name = {"train": "train", "valid": "val"}[split]
            head(os.path.join(shared, "multi30k", f"{name}.{lang}"), os.path.join(work, f"nmt.{split}.{lang}"), 200)
    run(*fairseq_tool("fairseq-preprocess"), "--only-source", "--trainpref", f"{work}/lm.train",
        "--validpref", f"{work}/lm.valid", "--destdir", f"{work}/lm", "--nwordssrc", "60")
    run(*fairseq_tool("fairseq-preprocess"), "--source-lang", "de", "--target-lang", "en", "--joined-dictionary",
        "--trainpref", f"{work}/nmt.train", "--validpref", f"{work}/nmt.valid", "--destdir", f"{work}/nmt",
        "--nwordssrc", "60", "--nwordstgt", "60")
    for kind in ("lm", "nmt"):
        os.makedirs(os.path.join(out, kind), exist_ok=True)
        for name in os.listdir(os.path.join(work, kind)):
            if name.startswith("dict"):
                shutil.copy(os.path.join(work, kind, name), os.path.join(out, kind, name))


def fixed_batch(model, kind):
    """The log-probabilities of a fixed batch: tokens 4.. of the dictionary, two rows."""
    tokens = torch.arange(4, 16).view(2, 6)
    with torch.no_grad():
        if kind == "lm":
            output = model(tokens)
        else:
            output = model(tokens, torch.tensor([6, 6]), tokens.flip(1))
        return tokens, model.get_normalized_probs(output, log_probs=True)


def main(shared, out):
    with tempfile.TemporaryDirectory() as work:
        prepare(shared, work, out)
        for family, (kind, flags) in FAMILIES.items():
            save_dir = os.path.join(work, family)
            run(*fairseq_tool("fairseq-train"), os.path.join(work, kind), *COMMON, *flags, "--save-dir", save_dir)
            checkpoint = os.path.join(out, f"{family}.pt")
            shutil.copy(os.path.join(save_dir, "checkpoint_last.pt"), checkpoint)
            [model], _ = checkpoint_utils.load_model_ensemble([checkpoint], arg_overrides={"data": os.path.join(out, kind)})
            model.eval()
            tokens, lprobs = fixed_batch(model, kind)
            torch.save({"tokens": tokens, "lprobs": lprobs}, os.path.join(out, f"{family}.expected.pt"))
            print(family, os.path.getsize(checkpoint), "bytes")


if __name__ == "__main__":
    main(*sys.argv[1:])
