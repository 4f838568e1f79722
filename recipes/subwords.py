"""Sentencepiece subwords for the translation recipes: train a joint model, encode a file.

``--model-type word`` makes a word-level vocabulary instead (whitespace-separated words, no
subwords; the most frequent --vocab-size of them, the rest <unk>), where embedding compression
matters most.
"""
import argparse
import sys

try:
    import sentencepiece as spm
except ImportError:
    sys.exit('subwords: error: sentencepiece not found: pip install torch==2.13.0 -e ".[recipes]" (in this repository)')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a joint BPE (or word) model on the given text files")
    train.add_argument("--model-prefix", required=True)
    train.add_argument("--model-type", choices=["bpe", "word"], default="bpe")
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("inputs", nargs="+")
    encode = commands.add_parser("encode", help="encode a text file into subword pieces")
    encode.add_argument("--model", required=True)
    encode.add_argument("--model-type", choices=["bpe", "word"], default="bpe", help="the type it was trained as")
    encode.add_argument("input")
    encode.add_argument("output")
    args = parser.parse_args(argv)
    if args.command == "train":
        spm.SentencePieceTrainer.train(
            input=",".join(args.inputs), model_prefix=args.model_prefix, vocab_size=args.vocab_size,
            model_type=args.model_type, character_coverage=1.0, input_sentence_size=2_000_000,
            shuffle_input_sentence=True, minloglevel=2, hard_vocab_limit=args.model_type == "bpe",
        )
        return
    model = spm.SentencePieceProcessor(model_file=args.model)
    with open(args.input, encoding="utf-8") as source, open(args.output, "w", encoding="utf-8") as out:
        for line in source:
            # A piece outside the model's vocabulary is written as fairseq's <unk>, so that
            # fairseq-preprocess does not add it to the dictionary (a word model's only limit);
            # words one by one, since sentencepiece merges a run of unknown words into one.
            if args.model_type == "word":
                ids = [model.piece_to_id("\u2581" + word) for word in line.split()]
            else:
                ids = model.encode(line.strip())
            out.write(" ".join("<unk>" if i == model.unk_id() else model.id_to_piece(i) for i in ids) + "\n")


if __name__ == "__main__":
    sys.exit(main())
