"""IWSLT14 German-English as the field prepares it (after fairseq's prepare-iwslt14.sh).

From the extracted de-en folder of the IWSLT14 TED archive:
- train and valid from train.tags.de-en.{de,en}: metadata lines (url, talkid, keywords,
  speaker, ...) dropped, title and description kept without their tags; pairs cleaned by
  length (1-175 words a side, length ratio at most 1.5); valid = every 23rd pair, train the rest;
- test from the official XML files, in this order: TED dev2010, TEDX dev2012, TED tst2010,
  tst2011, tst2012 (6,750 pairs), not cleaned.
Text stays cased and untokenized (sentencepiece and sacrebleu work on raw text).
"""
import argparse
import html
import os
import re
import sys

TEST_SETS = ("TED.dev2010", "TEDX.dev2012", "TED.tst2010", "TED.tst2011", "TED.tst2012")
KEPT_TAGS = re.compile(r"^\s*<(title|description)>(.*)</\1>\s*$")
SEGMENT = re.compile(r'<seg id="?\d+"?>(.*)</seg>')


class PreparationError(Exception):
    pass


def read_lines(path):
    if not os.path.isfile(path):
        raise PreparationError(f"{path} is missing: is this the extracted de-en folder of the IWSLT14 archive?")
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def tags_text(lines):
    """The sentences of a train.tags file: one entry per line, None for metadata lines."""
    sentences = []
    for line in lines:
        kept = KEPT_TAGS.match(line)
        if kept:
            sentences.append(kept.group(2).strip())
        elif line.lstrip().startswith("<"):
            sentences.append(None)
        else:
            sentences.append(line.strip())
    return sentences


def xml_segments(path):
    """The text of every <seg> in an IWSLT XML file, entities decoded."""
    segments = [html.unescape(m.group(1)).strip() for m in map(SEGMENT.search, read_lines(path)) if m]
    if not segments:
        raise PreparationError(f"{path} has no <seg> elements: is it an IWSLT XML file?")
    return segments


def keep_pair(source, target, max_words=175, max_ratio=1.5):
    source_words, target_words = len(source.split()), len(target.split())
    if not (1 <= source_words <= max_words and 1 <= target_words <= max_words):
        return False
    return max(source_words, target_words) / min(source_words, target_words) <= max_ratio


def training_pairs(orig, src, tgt):
    source = tags_text(read_lines(os.path.join(orig, f"train.tags.{src}-{tgt}.{src}")))
    target = tags_text(read_lines(os.path.join(orig, f"train.tags.{src}-{tgt}.{tgt}")))
    if len(source) != len(target):
        raise PreparationError(
            f"train.tags.{src}-{tgt}.{src} and .{tgt} have {len(source)} and {len(target)} "
            "lines: the files are not parallel (corrupt or truncated download?)"
        )
    return [(s, t) for s, t in zip(source, target) if s is not None and t is not None and keep_pair(s, t)]


def test_pairs(orig, src, tgt):
    pairs = []
    for name in TEST_SETS:
        source = xml_segments(os.path.join(orig, f"IWSLT14.{name}.{src}-{tgt}.{src}.xml"))
        target = xml_segments(os.path.join(orig, f"IWSLT14.{name}.{src}-{tgt}.{tgt}.xml"))
        if len(source) != len(target):
            raise PreparationError(f"IWSLT14.{name}: {len(source)} {src} segments but {len(target)} {tgt}")
        pairs.extend(zip(source, target))
    return pairs


def write_split(out_dir, split, pairs, src, tgt):
    for index, lang in ((0, src), (1, tgt)):
        with open(os.path.join(out_dir, f"{split}.{lang}"), "w", encoding="utf-8") as f:
            f.writelines(pair[index] + "\n" for pair in pairs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("orig", help="the extracted de-en folder (train.tags.de-en.*, IWSLT14.*.xml)")
    parser.add_argument("out", help="where train/valid/test.{de,en} go")
    parser.add_argument("--source-lang", default="de")
    parser.add_argument("--target-lang", default="en")
    parser.add_argument("--test-only", action="store_true", help="only the test split (the XML files)")
    args = parser.parse_args(argv)
    src, tgt = args.source_lang, args.target_lang
    try:
        os.makedirs(args.out, exist_ok=True)
        test = test_pairs(args.orig, src, tgt)
        write_split(args.out, "test", test, src, tgt)
        print(f"test: {len(test):,} pairs")
        if not args.test_only:
            pairs = training_pairs(args.orig, src, tgt)
            valid = pairs[22::23]
            train = [pair for i, pair in enumerate(pairs) if i % 23 != 22]
            write_split(args.out, "valid", valid, src, tgt)
            write_split(args.out, "train", train, src, tgt)
            print(f"train: {len(train):,} pairs, valid: {len(valid):,} pairs")
    except PreparationError as error:
        sys.exit(f"prepare_iwslt14: error: {error}")


if __name__ == "__main__":
    main()
