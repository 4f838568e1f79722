"""One line for a split that fairseq-preprocess wrote empty (from an empty text file), raised
before fairseq maps it: numpy cannot map an empty file, and fairseq shows that as a traceback."""
import functools
import os
import re

from fairseq.data import data_utils, indexed_dataset

from ..errors import RShareConfigError


def check_split_not_empty(path):
    """`path`: a binarised split as fairseq's loaders name it (data-bin/valid, or
    data-bin/valid.de-en.de), without .bin."""
    data_file = indexed_dataset.data_file_path(path)
    if os.path.isfile(data_file) and os.path.getsize(data_file) == 0:
        split = os.path.basename(path).split(".")[0]
        prefix_flag = f"--{re.sub(r'[0-9]+$', '', split)}pref"
        raise RShareConfigError(
            f"the {split} split is empty ({data_file}): give fairseq-preprocess a {prefix_flag} "
            "text file with at least one line, and run it again"
        )


_fairseq_load_indexed_dataset = data_utils.load_indexed_dataset


@functools.wraps(_fairseq_load_indexed_dataset)
def load_indexed_dataset(path, *args, **kwargs):
    check_split_not_empty(path)
    return _fairseq_load_indexed_dataset(path, *args, **kwargs)


def install():
    """Check each split that fairseq's own tasks (language_modeling, translation) load (done
    for command-line runs only)."""
    data_utils.load_indexed_dataset = load_indexed_dataset
