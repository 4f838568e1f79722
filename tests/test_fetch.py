"""recipes/fetch_data.py against a local HTTP mirror of the real corpora, the recipes' use of it,
and the one-line errors for missing recipe modules."""
import filecmp
import functools
import gzip
import http.server
import os
import runpy
import shutil
import subprocess
import sys
import threading

import pytest

from conftest import REPO, shared_corpus
from fairseq_rshare.tools import environment_with_tools

RECIPES = os.path.join(REPO, "recipes")
CORPORA = runpy.run_path(os.path.join(RECIPES, "fetch_data.py"))["CORPORA"]


def build_mirror(root, corpus):
    """Lay out the shared copy of corpus as its source does, under root/corpus (Multi30k gzipped)."""
    shared = shared_corpus(corpus)
    os.makedirs(root / corpus)
    for name, remote, _ in CORPORA[corpus][1]:
        if remote.endswith(".gz"):
            with open(os.path.join(shared, name), "rb") as f, gzip.open(root / corpus / remote, "wb") as out:
                shutil.copyfileobj(f, out)
        else:
            os.symlink(os.path.join(shared, name), root / corpus / remote)


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """URL of a local HTTP server: good/ mirrors every corpus, bad/ holds PTB with one byte changed
    in train.txt and a Multi30k whose train.de.gz is not gzip."""
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
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def fetch(corpus, dest, mirror_url):
    env = {**os.environ, "RSHARE_DATA_MIRROR": mirror_url}
    return subprocess.run([sys.executable, os.path.join(RECIPES, "fetch_data.py"), corpus, str(dest)],
                          capture_output=True, text=True, env=env)


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
    names = [name for name, _, _ in CORPORA[corpus][1]]
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
    expected = CORPORA["ptb"][1][0][2]
    assert "sha256 mismatch" in line and f"{mirror}/bad/ptb/ptb.train.txt" in line
    assert str(dest / "train.txt") in line and f"expected {expected}, got " in line
    assert not dest.exists()  # neither the file nor its temporary file, nor the folder
    dest.mkdir()  # a folder that was there stays, empty
    error_line(fetch("ptb", dest, f"{mirror}/bad"))
    assert os.listdir(dest) == []


def test_a_missing_file_or_a_bad_gzip_is_one_line(mirror, tmp_path):
    line = error_line(fetch("wikitext2", tmp_path / "w", f"{mirror}/missing"))
    assert "HTTP Error 404" in line and f"{mirror}/missing/wikitext2/train.txt" in line
    line = error_line(fetch("multi30k", tmp_path / "m", f"{mirror}/bad"))
    assert "cannot download" in line and "train.de.gz" in line
    assert os.listdir(tmp_path) == []


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
