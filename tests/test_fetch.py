"""recipes/fetch_data.py against a local HTTP mirror of the real corpora, the recipes' use of it,
and the one-line errors for missing recipe modules."""
import filecmp
import functools
import gzip
import http.server
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO, shared_corpus
from fairseq_rshare.tools import environment_with_tools
from recipes import fetch_data

RECIPES = os.path.join(REPO, "recipes")
CORPORA = fetch_data.CORPORA


def build_mirror(root, corpus):
    """Lay out the shared copy of corpus as its source does, under root/corpus (Multi30k gzipped)."""
    shared = shared_corpus(corpus)
    os.makedirs(root / corpus)
    for name, remote, _, _ in CORPORA[corpus][1]:
        if remote.endswith(".gz"):
            with open(os.path.join(shared, name), "rb") as f, gzip.open(root / corpus / remote, "wb") as out:
                shutil.copyfileobj(f, out)
        else:
            os.symlink(os.path.join(shared, name), root / corpus / remote)


STALL = threading.Event()


class MirrorHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the mirror's folder; under cut/ and stall/ each file announces its whole length, but
    cut/ sends half of it and stall/ half, then nothing until STALL is set."""

    def copyfile(self, source, outputfile):
        if not self.path.startswith(("/cut/", "/stall/")):
            return super().copyfile(source, outputfile)
        outputfile.write(source.read(os.fstat(source.fileno()).st_size // 2))
        outputfile.flush()
        if self.path.startswith("/stall/"):
            STALL.wait(60)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """URL of a local HTTP server: good/ mirrors every corpus as the sources lay them out, shared/ is
    ../shared/data (the recipes' layout); bad/ holds PTB with one byte changed in train.txt and a
    Multi30k whose train.de.gz is not gzip; big/ a PTB train.txt twice its size and a Multi30k
    train.de.gz of 50 MB of zeros (a decompression bomb); cut/ and stall/ serve good/ (see
    MirrorHandler)."""
    root = tmp_path_factory.mktemp("mirror")
    for corpus in CORPORA:
        build_mirror(root / "good", corpus)
    build_mirror(root / "bad", "ptb")
    train = root / "bad" / "ptb" / "ptb.train.txt"
    data = bytearray(train.read_bytes())
    train.unlink()
    data[1000] ^= 1
    train.write_bytes(bytes(data))
    os.makedirs(root / "bad" / "multi30k")
    (root / "bad" / "multi30k" / "train.de.gz").write_bytes(b"not gzip at all\n")
    os.makedirs(root / "big" / "ptb")
    (root / "big" / "ptb" / "ptb.train.txt").write_bytes(2 * (root / "good" / "ptb" / "ptb.train.txt").read_bytes())
    os.makedirs(root / "big" / "multi30k")
    (root / "big" / "multi30k" / "train.de.gz").write_bytes(gzip.compress(bytes(50 << 20), compresslevel=9))
    os.symlink(os.path.dirname(shared_corpus("ptb")), root / "shared")
    os.symlink(root / "good", root / "cut")
    os.symlink(root / "good", root / "stall")
    handler = functools.partial(MirrorHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    STALL.set()
    server.shutdown()
    server.server_close()


def fetch_command(corpus, dest):
    return [sys.executable, os.path.join(RECIPES, "fetch_data.py"), corpus, str(dest)]


def fetch(corpus, dest, mirror_url, max_file_size=None):
    """Run fetch_data.py; with max_file_size (bytes), the system kills it if it writes a larger file."""
    env = {**os.environ, "RSHARE_DATA_MIRROR": mirror_url}
    command = fetch_command(corpus, dest)
    if max_file_size:
        command = ["bash", "-c", f'ulimit -f {max_file_size // 1024} && exec "$@"', "bash", *command]
    return subprocess.run(command, capture_output=True, text=True, env=env)


def error_line(result):
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fetch_data.py: error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("corpus", sorted(CORPORA))
def test_fetch_gives_the_shared_files(corpus, mirror, tmp_path):
    dest = tmp_path / "data" / corpus
    result = fetch(corpus, dest, f"{mirror}/good/")
    assert result.returncode == 0, result.stderr
    names = [name for name, _, _, _ in CORPORA[corpus][1]]
    assert sorted(os.listdir(dest)) == sorted(names)
    for name in names:
        assert filecmp.cmp(dest / name, os.path.join(shared_corpus(corpus), name), shallow=False), name


def test_a_complete_destination_is_left_as_is(mirror, tmp_path):
    dest = tmp_path / "ptb"
    assert fetch("ptb", dest, f"{mirror}/good").returncode == 0
    stamps = {name: os.stat(dest / name).st_mtime_ns for name in os.listdir(dest)}
    result = fetch("ptb", dest, f"{mirror}/missing")  # any download would fail
    assert result.returncode == 0 and result.stdout == "", result.stderr
    assert {name: os.stat(dest / name).st_mtime_ns for name in os.listdir(dest)} == stamps


def test_a_changed_byte_is_a_checksum_error_and_leaves_nothing(mirror, tmp_path):
    dest = tmp_path / "ptb"
    line = error_line(fetch("ptb", dest, f"{mirror}/bad"))
    expected = CORPORA["ptb"][1][0][3]
    assert "sha256 mismatch" in line and f"{mirror}/bad/ptb/ptb.train.txt" in line
    assert str(dest / "train.txt") in line and f"expected {expected}, got " in line
    assert not dest.exists()  # neither the file nor its temporary file, nor the folder
    dest.mkdir()  # a folder that was there stays, empty
    error_line(fetch("ptb", dest, f"{mirror}/bad"))
    assert os.listdir(dest) == []


def test_a_missing_file_or_a_bad_gzip_is_one_line_saying_what_to_do(mirror, tmp_path):
    dest = tmp_path / "data" / "wikitext2"
    line = error_line(fetch("wikitext2", dest, f"{mirror}/missing"))
    assert "HTTP Error 404" in line and f"{mirror}/missing/wikitext2/train.txt" in line
    assert line.endswith(f"copy the wikitext2 files (train.txt, valid.txt, test.txt) into {dest}, "
                         "or set RSHARE_DATA_MIRROR to a URL or folder holding wikitext2/ with them")
    line = error_line(fetch("ptb", dest, f"{mirror}/missing"))  # a mirror in either layout
    assert f"{mirror}/missing/ptb/ptb.train.txt (HTTP Error 404: File not found) nor " \
           f"{mirror}/missing/ptb/train.txt (HTTP Error 404: File not found)" in line
    line = error_line(fetch("multi30k", tmp_path / "m", f"{mirror}/bad"))
    assert "cannot download" in line and "train.de.gz" in line
    assert os.listdir(tmp_path) == []  # the folders it made are gone


@pytest.mark.parametrize("mirror_form", ["folder", "file-url", "http"])
def test_a_mirror_in_the_recipes_own_layout(mirror_form, mirror, tmp_path):
    shared = os.path.dirname(shared_corpus("multi30k"))
    url = {"folder": shared, "file-url": f"file://{shared}/", "http": f"{mirror}/shared"}[mirror_form]
    result = fetch("multi30k", tmp_path / "multi30k", url)
    assert result.returncode == 0, result.stderr
    for name, _, _, _ in CORPORA["multi30k"][1]:
        assert filecmp.cmp(tmp_path / "multi30k" / name, os.path.join(shared, "multi30k", name), shallow=False)
    assert f"from {url.rstrip('/') if mirror_form == 'http' else shared}/multi30k/train.de (size" in result.stdout


def test_a_local_mirror_is_checked_too(tmp_path):
    copy = tmp_path / "mirror" / "ptb"
    copy.mkdir(parents=True)
    for name in ("train.txt", "valid.txt", "test.txt"):
        shutil.copy(os.path.join(shared_corpus("ptb"), name), copy / name)
    with open(copy / "valid.txt", "ab") as f:
        f.write(b"one more line\n")
    line = error_line(fetch("ptb", tmp_path / "ptb", f"file://{tmp_path / 'mirror'}"))
    assert f"{copy / 'valid.txt'} holds more than 399782 bytes, the file's size" in line
    assert sorted(os.listdir(tmp_path / "ptb")) == ["train.txt"]


@pytest.mark.parametrize("corpus,served", [("ptb", "ptb/ptb.train.txt"), ("multi30k", "multi30k/train.de.gz")])
def test_reading_stops_at_the_files_size(corpus, served, mirror, tmp_path):
    """A file, or a gzip file's text, past its known size: nothing over that size is written."""
    name, _, size, _ = CORPORA[corpus][1][0]
    line = error_line(fetch(corpus, tmp_path / corpus, f"{mirror}/big", max_file_size=size + (1 << 20)))
    assert line.startswith(f"fetch_data.py: error: {mirror}/big/{served} holds more than {size} bytes, the file's size")
    assert os.listdir(tmp_path) == []


def test_a_download_cut_short_is_one_line(mirror, tmp_path):
    line = error_line(fetch("ptb", tmp_path / "ptb", f"{mirror}/cut"))
    size = CORPORA["ptb"][1][0][2]
    assert f"from {mirror}/cut/ptb/ptb.train.txt: {size // 2} bytes, expected {size} (the download was cut short" in line
    assert os.listdir(tmp_path) == []


def test_the_temporary_file_of_a_killed_fetch_is_removed_by_the_next(mirror, tmp_path):
    dest = tmp_path / "ptb"
    killed = subprocess.Popen(fetch_command("ptb", dest), env={**os.environ, "RSHARE_DATA_MIRROR": f"{mirror}/stall"})
    for _ in range(600):  # until it is downloading (the server then stalls)
        if dest.exists() and os.listdir(dest):
            break
        time.sleep(0.1)
    killed.kill()
    killed.wait()
    assert os.listdir(dest) == [f".train.txt.{killed.pid}.part"]
    assert fetch("ptb", dest, f"{mirror}/good").returncode == 0
    assert sorted(os.listdir(dest)) == ["test.txt", "train.txt", "valid.txt"]


def test_a_different_file_already_there_is_not_overwritten(mirror, tmp_path):
    (tmp_path / "train.txt").write_text("my own text\n")
    line = error_line(fetch("ptb", tmp_path, f"{mirror}/good"))
    assert "is already there" in line and "delete it" in line
    assert (tmp_path / "train.txt").read_text() == "my own text\n"


def recipe_env(tmp_path, **variables):
    return {**environment_with_tools(), "OMP_NUM_THREADS": "1", "RSHARE_DATA": str(tmp_path / "no-shared-data"),
            "XDG_CACHE_HOME": str(tmp_path / "cache"), **variables}


@pytest.mark.slow
def test_lm_recipe_fetches_its_corpus_when_there_is_no_shared_copy(mirror, tmp_path):
    env = recipe_env(tmp_path, RSHARE_DATA_MIRROR=f"{mirror}/good", PRESET="smoke", STEPS="prepare",
                     WORK=str(tmp_path / "work"))
    env.pop("DATA", None)
    result = subprocess.run(["bash", os.path.join(RECIPES, "lm.sh")], capture_output=True, text=True,
                            env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    cache = tmp_path / "cache" / "fairseq-rshare" / "data" / "ptb"
    assert "sha256 checked" in result.stderr and f"fairseq-preprocess {cache}" in result.stdout
    for name in ("train.txt", "valid.txt", "test.txt"):
        assert filecmp.cmp(cache / name, os.path.join(shared_corpus("ptb"), name), shallow=False)
    assert (tmp_path / "work" / "data-bin" / "dict.txt").exists()


def test_a_recipe_that_cannot_fetch_its_corpus_says_to_set_data(mirror, tmp_path):
    env = recipe_env(tmp_path, RSHARE_DATA_MIRROR=f"{mirror}/missing", STEPS="prepare", WORK=str(tmp_path / "work"))
    env.pop("DATA", None)
    result = subprocess.run(["bash", os.path.join(RECIPES, "lm.sh")], capture_output=True, text=True,
                            env=env, cwd=tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lm.sh: error: "), result.stderr
    assert f"cannot download {mirror}/missing/ptb/ptb.train.txt" in lines[0]
    assert lines[0].endswith("RSHARE_DATA_MIRROR to a URL or folder holding ptb/ with them; "
                             "or set DATA to a folder holding the ptb files")
    assert os.listdir(tmp_path) == []  # neither the cache folders nor WORK


def fake_missing(tmp_path, module):
    """A PYTHONPATH folder whose `module` fails to import, as when it is not installed."""
    fake = tmp_path / "missing"
    fake.mkdir(exist_ok=True)
    (fake / f"{module}.py").write_text(f"raise ImportError('No module named {module}')\n")
    return str(fake)


def test_translation_recipe_without_sentencepiece_stops_first(tmp_path):
    env = recipe_env(tmp_path, PYTHONPATH=fake_missing(tmp_path, "sentencepiece"), DATA=str(tmp_path),
                     WORK=str(tmp_path / "work"), PRESET="smoke")
    result = subprocess.run(["bash", os.path.join(RECIPES, "translation.sh")], capture_output=True,
                            text=True, env=env, cwd=tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == ("translation.sh: error: python module sentencepiece not found: "
                             'pip install torch==2.13.0 -e ".[recipes]" (in this repository)\n')
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("script,module,args", [
    ("results_table.py", "matplotlib", ["results", "--markdown", "r.md"]),
    ("subwords.py", "sentencepiece", ["encode", "--model", "m", "in", "out"]),
])
def test_a_missing_module_is_one_line_before_any_work(script, module, args, tmp_path):
    env = {**os.environ, "PYTHONPATH": fake_missing(tmp_path, module)}
    result = subprocess.run([sys.executable, os.path.join(RECIPES, script), *args], capture_output=True,
                            text=True, env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == (f"{script[:-3]}: error: {module} not found: "
                             'pip install torch==2.13.0 -e ".[recipes]" (in this repository)\n')
    assert os.listdir(tmp_path) == ["missing"]
