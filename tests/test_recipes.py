"""The recipes: IWSLT14 preparation on the real XML files, bad input, and shortened end-to-end runs."""
import json
import math
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, THREADS, shared_corpus
from fairseq_rshare.tools import environment_with_tools
from recipes import budget, record_result, results_table, variants

RECIPES = os.path.join(REPO, "recipes")
MARKUP = re.compile(r"</?(seg|doc|url|talkid|keywords|speaker|title|description|refset|srcset)\b|&(amp|lt|gt|quot);")


def recipe(script, tmp_path, check=True, path=None, **variables):
    """Run a recipe with the given variables; return the CompletedProcess."""
    env = {**environment_with_tools(), "OMP_NUM_THREADS": str(THREADS), **{k: str(v) for k, v in variables.items()}}
    if path:
        env["PATH"] = path
    result = subprocess.run(["bash", os.path.join(RECIPES, script)], capture_output=True, text=True,
                            env=env, cwd=tmp_path)
    if check and result.returncode:
        raise AssertionError(f"{script} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def python_script(name, *args, cwd=None):
    return subprocess.run([sys.executable, os.path.join(RECIPES, name), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd)


def count_segments(path):
    with open(path, encoding="utf-8") as f:
        return sum(line.lstrip().startswith("<seg id=") for line in f)


def lines_of(path):
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def test_iwslt14_test_split_from_the_real_xml_files(tmp_path):
    orig = shared_corpus("iwslt14/orig")
    result = python_script("prepare_iwslt14.py", orig, tmp_path, "--test-only")
    assert result.returncode == 0, result.stderr
    german, english = lines_of(tmp_path / "test.de"), lines_of(tmp_path / "test.en")
    expected = sum(count_segments(os.path.join(orig, name)) for name in os.listdir(orig) if name.endswith(".en.xml"))
    assert len(german) == len(english) == expected == 6750
    assert all(line.strip() for line in german + english)
    assert not [line for line in german + english if MARKUP.search(line)]
    with open(os.path.join(orig, "IWSLT14.TED.dev2010.de-en.en.xml"), encoding="utf-8") as f:
        first_segment = re.search(r'<seg id="1">(.*?)</seg>', f.read()).group(1).strip()
    assert english[0] == first_segment
    assert "R&D" in " ".join(english)  # entities decoded, not dropped


def test_iwslt14_training_split_drops_metadata_cleans_and_holds_out_every_23rd(tmp_path):
    orig = tmp_path / "de-en"
    orig.mkdir()
    iwslt = shared_corpus("iwslt14/orig")
    for name in os.listdir(iwslt):
        if name.endswith(".xml"):
            os.symlink(os.path.join(iwslt, name), orig / name)
    german, english = [], []
    for talk in range(3):
        german += [f"<url>http://www.ted.com/talks/{talk}</url>", f"<talkid>{talk}</talkid>",
                   f"<title>Titel {talk}</title>", "<speaker>Jemand</speaker>"]
        english += [f"<url>http://www.ted.com/talks/{talk}</url>", f"<talkid>{talk}</talkid>",
                    f"<title>Title {talk}</title>", "<speaker>Someone</speaker>"]
        for i in range(30):
            german.append(f"satz {talk} {i} eins zwei")
            english.append(f"sentence {talk} {i} one two")
        german.append("ein viel zu langer satz " + "wort " * 20)  # ratio > 1.5: cleaned away
        english.append("short one")
    (orig / "train.tags.de-en.de").write_text("\n".join(german) + "\n", encoding="utf-8")
    (orig / "train.tags.de-en.en").write_text("\n".join(english) + "\n", encoding="utf-8")

    result = python_script("prepare_iwslt14.py", orig, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    kept = [f"Title {t}" if i < 0 else f"sentence {t} {i} one two" for t in range(3) for i in range(-1, 30)]
    train, valid = lines_of(tmp_path / "out/train.en"), lines_of(tmp_path / "out/valid.en")
    assert valid == kept[22::23]
    assert train == [line for i, line in enumerate(kept) if i % 23 != 22]
    assert len(lines_of(tmp_path / "out/train.de")) == len(train)

    (orig / "train.tags.de-en.de").write_text("\n".join(german[:-5]) + "\n", encoding="utf-8")
    result = python_script("prepare_iwslt14.py", orig, tmp_path / "out")
    assert result.returncode == 1
    assert "not parallel" in result.stderr


def small_lm_corpus(folder, splits=("train", "valid", "test")):
    folder.mkdir()
    for split in splits:
        (folder / f"{split}.txt").write_text("the cat sat on the mat\na dog ran\n" * 50)
    return folder


@pytest.mark.parametrize(
    "variables,message",
    [
        ({"DATA": "/nonexistent"}, "DATA=/nonexistent has no train.txt"),
        ({"PRESET": "tpu"}, "PRESET=tpu: use cpu, gpu or smoke"),
        ({"VARIANTS": "rshare-2"}, "variant 'rshare-2'"),
        ({"VARIANTS": "rshare-0.1-output"}, "unknown suffix '-output'"),
        ({"VARIANTS": "rshare-0.1-k4x"}, "unknown suffix '-k4x'"),
        ({"SEED": "x"}, "SEED=x: give the training seed as a whole number"),
    ],
)
def test_lm_recipe_bad_input_stops_with_one_message(tmp_path, variables, message):
    data = small_lm_corpus(tmp_path / "corpus")
    result = recipe("lm.sh", tmp_path, check=False, **{"DATA": data, "PRESET": "smoke", **variables})
    assert result.returncode == 1
    assert message in result.stderr
    assert result.stderr.count("error:") == 1


def test_lm_recipe_names_a_missing_split_and_a_missing_tool(tmp_path):
    data = small_lm_corpus(tmp_path / "corpus", splits=("train", "valid"))
    result = recipe("lm.sh", tmp_path, check=False, DATA=data, PRESET="smoke")
    assert result.returncode == 1 and "has no test.txt" in result.stderr
    result = recipe("lm.sh", tmp_path, check=False, DATA=data, PRESET="smoke", path="/usr/bin:/bin")
    assert result.returncode == 1 and "fairseq-preprocess not found" in result.stderr


def test_translation_recipe_names_a_wrong_language_pair_and_missing_data(tmp_path):
    multi30k = shared_corpus("multi30k")
    result = recipe("translation.sh", tmp_path, check=False, DATA=multi30k, SRC="fr", PRESET="smoke")
    assert result.returncode == 1
    assert "has no train.fr: check DATA and the language pair SRC=fr TGT=en" in result.stderr
    result = recipe("translation.sh", tmp_path, check=False, DATA=tmp_path / "none", PRESET="smoke")
    assert result.returncode == 1 and "is not a folder" in result.stderr
    result = recipe("translation.sh", tmp_path, check=False, DATA=multi30k, VOCAB="8k")
    assert result.returncode == 1 and "VOCAB=8k: give the vocabulary size as a whole number" in result.stderr
    result = recipe("translation.sh", tmp_path, check=False, DATA=multi30k, VARIANTS="rshare-0.1-input")
    assert result.returncode == 1 and "-input needs untied tables" in result.stderr
    # untied, the same name passes (and the recipe goes on to find no prepared data)
    result = recipe("translation.sh", tmp_path, check=False, DATA=multi30k, VARIANTS="rshare-0.1-input-untied",
                    STEPS="train", WORK=tmp_path / "empty")
    assert result.returncode == 1 and "run the prepare step first" in result.stderr


@pytest.mark.slow
def test_failed_training_leaves_no_results_json(tmp_path):
    data = small_lm_corpus(tmp_path / "corpus")
    result = recipe("lm.sh", tmp_path, check=False, DATA=data, PRESET="smoke", WORK=tmp_path / "work",
                    VARIANTS="dense", EXTRA="--lr -1 --no-such-flag")
    assert result.returncode == 1
    assert "training dense failed: see" in result.stderr
    assert os.listdir(tmp_path / "work/results") == []


@pytest.mark.slow
def test_lm_recipe_resumes_a_stopped_run(tmp_path):
    data = small_lm_corpus(tmp_path / "corpus")
    variables = dict(DATA=data, PRESET="smoke", WORK=tmp_path / "work", VARIANTS="rshare-0.1-bias")
    started = time.monotonic()
    recipe("lm.sh", tmp_path, STEPS="prepare train", EXTRA="--max-update 10", **variables)
    resumed = recipe("lm.sh", tmp_path, STEPS="train evaluate", EXTRA="--max-update 20", **variables)
    elapsed = time.monotonic() - started
    assert "resume rshare-0.1-bias (smoke preset) from" in resumed.stdout
    log = (tmp_path / "work/rshare-0.1-bias/train.log").read_text()
    assert re.search(r"Loaded checkpoint \S+checkpoint_last\.pt \(epoch \d+ @ 10 updates\)", log)
    with open(tmp_path / "work/results/rshare-0.1-bias.json") as f:
        result = json.load(f)
    assert result["updates"] == 20
    assert 0 < result["train_seconds"] < elapsed  # both segments, read from the log


def check_results(results_dir, variants, metric, better_than, checkpoint="checkpoint_best.pt", suffix=""):
    """The results JSON of each variant (named variant + suffix) in results_dir, checked."""
    results = {}
    for variant in variants:
        with open(os.path.join(results_dir, f"{variant}{suffix}.json")) as f:
            results[variant] = json.load(f)
        assert results[variant]["variant"] == variant + suffix
        value = results[variant][metric]
        assert math.isfinite(value) and better_than(value), (variant, value)
        assert results[variant]["checkpoint_bytes"] == os.path.getsize(
            os.path.join(results_dir, "..", variant, checkpoint))
        assert results[variant]["words_per_second"] > 0
    assert not [name for name in os.listdir(results_dir) if not name.endswith(".json")]
    return results


def tabulate(results_dir, tmp_path):
    result = python_script("results_table.py", results_dir, "--markdown", tmp_path / "r.md",
                           "--compression-plot", tmp_path / "c.png", "--budget-plot", tmp_path / "b.png")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "c.png").stat().st_size > 1000 and (tmp_path / "b.png").stat().st_size > 1000
    return (tmp_path / "r.md").read_text()


@pytest.mark.parametrize("recipe,name,flags", [
    ("lm", "dense", "--rshare-tables none --criterion rshare_cross_entropy"),
    ("lm", "rshare-0.1-freq-bias-k25", "--rshare-ratio 0.1 --criterion rshare_cross_entropy "
     "--rshare-frequent-words 500 --rshare-output-bias --rshare-subvectors 25"),
    ("lm", "rshare-0.01-input-in0.02-out0.3-std0.2-scale", "--rshare-ratio 0.01 --criterion rshare_cross_entropy "
     "--rshare-tables decoder-input --rshare-input-ratio 0.02 --rshare-output-ratio 0.3 --rshare-init-std 0.2 "
     "--rshare-word-scale"),
    ("lm", "dense-tied-h150-drop0.3", "--rshare-tables none --criterion rshare_cross_entropy "
     "--share-decoder-input-output-embed --decoder-embed-dim 150 --decoder-hidden-size 150 --decoder-out-embed-dim 150 --dropout 0.3"),
    ("lm", "rshare-0.1-bias-poollr2", "--rshare-ratio 0.1 --criterion rshare_cross_entropy --rshare-output-bias "
     "--pool-lr-scale 2"),
    ("translation", "dense", "--rshare-tables none --criterion rshare_cross_entropy --share-all-embeddings"),
    ("translation", "rshare-0.1-freq", "--rshare-ratio 0.1 --criterion rshare_cross_entropy --share-all-embeddings "
     "--rshare-frequent-words 500"),
    ("translation", "rshare-0.1-input-untied", "--rshare-ratio 0.1 --criterion rshare_cross_entropy "
     "--rshare-tables encoder-input,decoder-input"),
])
def test_run_names_give_their_flags(recipe, name, flags):
    assert variants.flags(recipe, name, words=10_000) == flags


def test_runs_that_start_from_their_teacher():
    name = "rshare-0.15-bias-scale-kmeans-distill-tied-drop0.3"
    assert variants.teacher(name) == "dense-tied-drop0.3"
    assert variants.stage("lm", name) == "k-means codes + fine-tune + distillation"
    assert variants.stage("lm", "rshare-0.1-distill0.7") == "scratch + distillation"
    assert variants.stage("lm", "rshare-0.1-bias") == "scratch"
    assert variants.teacher_checkpoint("lm", "rshare-0.1-bias", "w") == ""
    assert variants.teacher_checkpoint("translation", "rshare-0.1-compress-untied", "w") == \
        os.path.join("w", "dense-untied", "checkpoint_average.pt")
    flags = variants.flags("lm", name, 10_000, "w")
    compressed = os.path.join("w", "compressed", name + ".pt")
    teacher = os.path.join("w", "dense-tied-drop0.3", "checkpoint_best.pt")
    assert f"--rshare-mapping kmeans --finetune-from-model {compressed}" in flags
    assert f"--teacher-path {teacher} --distill-weight 0.5" in flags
    assert flags.startswith("--rshare-ratio 0.15 --criterion rshare_distill ") and flags.count("--criterion") == 1
    assert variants.compress_flags("lm", name, 10_000, "w") == (
        f"{teacher} {compressed} --rshare-ratio 0.15 --rshare-output-bias --rshare-word-scale --rshare-mapping kmeans")
    assert variants.compress_flags("lm", "rshare-0.1-distill", 10_000, "w") == ""
    # a run of seed 2 starts from its teacher's seed-2 run, into a compressed checkpoint of its own
    teacher2 = os.path.join("w", "dense-tied-drop0.3-seed2", "checkpoint_best.pt")
    compressed2 = os.path.join("w", "compressed", name + "-seed2.pt")
    assert variants.compress_flags("lm", name, 10_000, "w", seed=2).startswith(f"{teacher2} {compressed2} ")
    assert f"--teacher-path {teacher2} " in variants.flags("lm", name, 10_000, "w", seed=2)


@pytest.mark.parametrize("recipe,name,message", [
    ("lm", "rshare-1.5", "rshare takes a ratio R with 0 < R < 1"),
    ("lm", "sparse", "start it with dense or rshare-R"),
    ("lm", "dense-bias", "-bias needs an rshare base"),
    ("lm", "rshare-0.1-bias-bias", "-bias appears twice"),
    ("lm", "rshare-0.1-untied", "unknown suffix '-untied' for lm.sh"),
    ("translation", "rshare-0.1-h200", "unknown suffix '-h200' for translation.sh"),
    ("translation", "rshare-0.1-input", "-input needs untied tables"),
    ("lm", "rshare-0.1-compress-kmeans", "-compress and -kmeans are two ways to start"),
    ("lm", "dense-distill", "-distillW needs an rshare base"),
])
def test_a_bad_run_name_says_what_is_wrong(recipe, name, message):
    with pytest.raises(variants.VariantError, match=message):
        variants.flags(recipe, name)


def test_the_grammar_is_printed_by_help():
    result = subprocess.run([sys.executable, "-m", "recipes.variants", "--help"], capture_output=True, text=True,
                            cwd=REPO)
    assert result.returncode == 0
    for suffix in variants.SUFFIXES:
        assert suffix.name in result.stdout


def test_best_at_budget_keeps_the_runs_no_smaller_run_beats():
    best_at_budget = results_table.best_at_budget
    # (name, parameters, perplexity, BLEU): b loses to a, c ties b's size and wins, d loses to c
    runs = [("a", 1, 150.0, 30.0), ("b", 2, 160.0, 29.0), ("c", 2, 140.0, 31.0), ("d", 3, 145.0, 30.5),
            ("e", 4, 120.0, 33.0)]
    runs = [{"variant": name, "size": size, "test_ppl": ppl, "test_bleu": bleu} for name, size, ppl, bleu in runs]
    for metric in ("test_ppl", "test_bleu"):
        curve = best_at_budget(runs[::-1], lambda run: run["size"], metric)
        assert [run["variant"] for run in curve] == ["a", "c", "e"], metric


def test_labels_of_crowded_points_neither_overlap_nor_leave_the_panel():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.text import Text
    figure, axis = plt.subplots(figsize=(4, 3))
    # four points a label's height apart, the last at the right edge, where a label to its right leaves the panel
    points = [(1.0, 100.0), (1.05, 100.2), (1.1, 99.9), (3.0, 90.0)]
    axis.plot(*zip(*points), "o")
    axis.set_xlim(0.9, 3.0)
    results_table.place_labels(axis, [(x, y, f"rshare-0.{i}-bias-scale-tied", "black") for i, (x, y) in enumerate(points)])
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    panel = axis.get_window_extent(renderer)
    boxes = [Text.get_window_extent(text, renderer) for text in axis.texts]  # the texts, not their leaders
    plt.close(figure)
    assert len(boxes) == 4
    assert not any(first.overlaps(second) for i, first in enumerate(boxes) for second in boxes[i + 1:])
    assert all(panel.x0 <= box.x0 and box.x1 <= panel.x1 and panel.y0 <= box.y0 and box.y1 <= panel.y1 for box in boxes)


def test_a_label_moves_off_a_curve_that_runs_through_its_first_place():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.text import Text
    figure, axis = plt.subplots(figsize=(4, 3))
    # a flat curve from the point to the right edge: right of the point the label would cross it,
    # left of it the label would leave the panel
    axis.plot([1.0, 3.0], [100.0, 100.0], "o-")
    axis.set_xlim(0.95, 3.05)
    axis.set_ylim(90.0, 110.0)
    results_table.place_labels(axis, [(1.0, 100.0, "rshare-0.1-bias-scale-tied", "black")])
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    panel = axis.get_window_extent(renderer)
    (label,) = axis.texts
    box = Text.get_window_extent(label, renderer)
    curve_height = axis.transData.transform((1.0, 100.0))[1]
    plt.close(figure)
    assert panel.x0 <= box.x0 and box.x1 <= panel.x1
    assert not box.y0 <= curve_height <= box.y1


def test_seeds_of_a_variant_are_one_point_with_their_mean_and_spread():
    points = results_table.points
    def run(variant, seed, ppl):
        return {"corpus": "ptb", "preset": "cpu", "variant": variant, "seed": seed, "test_ppl": ppl,
                "params": {"input": 10, "output": 10, "body": 5}, "words_per_second": 100.0 * seed,
                "train_seconds": 60.0}
    merged = points([run("a", 1, 100.0), run("a", 2, 104.0), run("a", 3, 99.0), run("b", 1, 90.0)])
    a = next(point for point in merged if point["variant"] == "a")
    assert a["seeds"] == [1, 2, 3] and a["test_ppl"] == pytest.approx(101.0)
    assert (a["low"], a["high"], a["words_per_second"]) == (99.0, 104.0, 200.0)
    b = next(point for point in merged if point["variant"] == "b")
    assert b["seeds"] == [1] and b["low"] == b["high"] == b["test_ppl"] == 90.0
    with pytest.raises(SystemExit, match="two results of seed 2"):
        points([run("a", 2, 100.0), run("a", 2, 101.0)])


def test_runs_of_another_schedule_are_other_points_and_panels():
    def run(variant, command, ppl):
        return {"corpus": "ptb", "preset": "cpu", "variant": variant, "test_ppl": ppl, "command": command,
                "params": {"input": 10, "output": 10, "body": 5}, "embedding_softmax_params": 20,
                "words_per_second": 1.0, "train_seconds": 60.0, "checkpoint_bytes": 1}
    nine = "fairseq-train d --max-epoch 13 --max-epoch 9"  # EXTRA's later flag wins
    results = [run("dense", nine, 100.0), run("dense", "fairseq-train d --max-epoch 13", 110.0),
               run("rshare-0.1", nine, 105.0), run("rshare-0.2", "fairseq-train d --max-update 50", 90.0)]
    merged = results_table.points(results)
    assert sorted((p["variant"], p["schedule"]) for p in merged) == [
        ("dense", "13 epochs"), ("dense", "9 epochs"), ("rshare-0.1", "9 epochs"), ("rshare-0.2", "50 updates")]
    assert set(results_table.groups(merged)) == {("ptb", "cpu", "13 epochs"), ("ptb", "cpu", "9 epochs"),
                                                 ("ptb", "cpu", "50 updates")}
    table = results_table.markdown(results)
    assert "| ptb | cpu | 9 epochs | rshare-0.1 | test ppl | 105.00 | +5.0 % |" in table  # against the 9-epoch dense
    assert "| ptb | cpu | 50 updates | rshare-0.2 | test ppl | 90.00 | -" in table  # against a dense of another schedule
    assert results_table.schedule({"command": "fairseq-train d"}) == "no limit"


def test_seeds_in_other_precisions_are_one_point_that_names_each_precision():
    precision = results_table.precision
    assert precision({"command": "fairseq-train d --max-epoch 13 --bf16"}) == "bf16"
    assert precision({"command": "fairseq-train d --fp16 --max-update 50"}) == "fp16"
    assert precision({"command": "fairseq-train d --max-epoch 13 --bf16-sr"}) == "float32"  # another flag
    assert precision({"command": "fairseq-train d --max-epoch 13 --fp16 --fp16-init-scale 4"}) == "fp16"

    def run(variant, seed, ppl, precision_flag=""):
        return {"corpus": "wikitext2", "preset": "cpu", "variant": variant, "seed": seed, "test_ppl": ppl,
                "command": f"fairseq-train d --max-epoch 13 {precision_flag}", "params": {"input": 10, "body": 5},
                "embedding_softmax_params": 10, "words_per_second": 1.0, "train_seconds": 60.0, "checkpoint_bytes": 1}
    results = [run("dense", 1, 120.0, "--bf16"), run("dense", 2, 124.0), run("rshare-0.5", 1, 110.0, "--bf16")]
    table = results_table.markdown(results)
    assert "| wikitext2 | cpu | 13 epochs, bf16/float32 | dense | test ppl | 122.00 (120.00–124.00, 2 seeds) |" in table
    assert "| wikitext2 | cpu | 13 epochs, bf16 | rshare-0.5 | test ppl | 110.00 | -9.8 % |" in table
    assert set(results_table.groups(results_table.points(results))) == {("wikitext2", "cpu", "13 epochs")}
    assert results_table.schedule_text("13 epochs", ["float32", "float32"]) == "13 epochs"
    with pytest.raises(SystemExit, match="two results of seed 1: tabulate a rerun"):
        results_table.points([run("dense", 1, 120.0, "--bf16"), run("dense", 1, 120.1)])


def test_runs_from_a_teacher_get_a_table_beside_it():
    def run(variant, ppl, tables, **extra):
        return {"corpus": "ptb", "preset": "cpu", "variant": variant, "test_ppl": ppl, "stage": "scratch",
                "params": {"input": tables, "output": 0, "body": 5}, "embedding_softmax_params": tables,
                "words_per_second": 100.0, "train_seconds": 600.0, "checkpoint_bytes": 1e6, **extra}
    teacher = {"variant": "dense-tied", "test_ppl": 100.0, "updates": 30212, "train_seconds": 1200.0,
               "params": {"input": 2000, "output": 0, "body": 5}}
    student = run("rshare-0.1-kmeans-tied", 103.0, 190, stage="k-means codes + fine-tune", teacher=teacher, updates=5000,
                  compressed={"relative_errors": {"t": 0.5}, "valid_ppl": 150.0, "teacher_valid_ppl": 110.0})
    assert results_table.teacher_markdown([run("dense", 90.0, 4000)]) == ""
    table = results_table.markdown([run("dense", 90.0, 4000), student])
    # 103 / 100 - 1 = +3.0 %; 190 / 2000 = 9.5 %; each stage's updates
    assert ("| ptb | cpu | no limit | rshare-0.1-kmeans-tied | k-means codes + fine-tune | dense-tied | 100.00 | 103.00 "
            "| +3.0 % | 9.5 % | 150.00 (110.00) | 30,212 | 5,000 |") in table
    assert table.count("| dense |") == 1  # the teacher table lists the students only
    # two seeds, each from its own seed's teacher: means against means, both spreads shown
    second = run("rshare-0.1-kmeans-tied", 107.0, 190, stage="k-means codes + fine-tune", seed=2, updates=5000,
                 teacher={**teacher, "test_ppl": 104.0},
                 compressed={"relative_errors": {"t": 0.5}, "valid_ppl": 160.0, "teacher_valid_ppl": 114.0})
    table = results_table.teacher_markdown([student, second])
    # (103 + 107) / 2 = 105 against (100 + 104) / 2 = 102: +2.9 %
    assert ("| dense-tied | 102.00 (100.00–104.00, 2 seeds) | 105.00 (103.00–107.00, 2 seeds) | +2.9 % | 9.5 % "
            "| 155.00 (112.00) |") in table
    # an input table compressed alone, beside the dense output layer it kept: 20 / 2000 = 1.0 %, not
    # (20 + 2010) / (2000 + 2010)
    untied = {**teacher, "variant": "dense", "params": {"input": 2000, "output": 2010, "body": 5}}
    alone = run("rshare-0.01-input-kmeans", 104.0, 2030, stage="k-means codes + fine-tune", teacher=untied,
                updates=5000, params={"input": 20, "output": 2010, "body": 5})
    assert "| dense | 100.00 | 104.00 | +4.0 % | 1.0 % | – |" in results_table.teacher_markdown([alone])


def test_record_result_reads_the_seed_and_the_validation_curve(tmp_path):
    log = tmp_path / "train.log"
    log.write_text(
        "2026-01-01 | INFO | valid | epoch 001 | valid on 'valid' subset | loss 7.5 | nll_loss 7.5 | "
        "ppl 185.8 | wps 9000 | wpb 200 | bsz 10 | num_updates 2324\n"
        "2026-01-01 | INFO | valid | epoch 002 | valid on 'valid' subset | loss 7.1 | nll_loss 7.1 | "
        "ppl 1,143.7 | wps 9000 | wpb 200 | bsz 10 | num_updates 4648 | best_loss 7.1\n")
    assert record_result.validation_curve(str(log)) == [[2324, 185.8], [4648, 1143.7]]
    assert record_result.training_seed("fairseq-train data --seed 1 --lr 1 --seed 3") == 3
    assert record_result.training_seed("fairseq-train data --lr 1") == 1


def test_record_result_sums_the_wall_time_of_every_segment_of_a_resumed_run(tmp_path):
    log = tmp_path / "train.log"
    log.write_text(
        "2026-01-01 23:59:00 | INFO | fairseq_cli.train | {'_name': None, 'common': {}}\n"
        "2026-01-02 00:09:00 | INFO | train_inner | epoch 001:    500 / 900 loss=7.1, num_updates=500\n"
        "2026-01-02 00:09:30 | INFO | fairseq.trainer | Saved checkpoint (epoch 1 @ 500 updates)\n"
        "/venv/lib/python3.11/site-packages/torch/utils/data/dataloader.py:1102: UserWarning: ...\n"
        "2026-01-02 04:59:58 | INFO | fairseq.tasks.text_to_speech | Please install tensorboardX\n"
        "2026-01-02 05:00:00 | INFO | fairseq_cli.train | {'_name': None, 'common': {}}\n"
        "2026-01-02 05:00:05 | INFO | fairseq_cli.train | model: RShareLSTMLanguageModel\n"
        "2026-01-02 05:20:05 | INFO | fairseq_cli.train | done training in 1195.0 seconds\n")
    # a segment of 10.5 minutes stopped after its last line, then 20 resumed; not the 5 hours between,
    # which end at the resumed run's import-time notice
    assert record_result.training_seconds(str(log)) == 630 + 1205
    log.write_text("2026-01-01 00:00:00 | INFO | fairseq.trainer | Saved checkpoint\n")
    with pytest.raises(SystemExit, match="has no fairseq-train start"):
        record_result.training_seconds(str(log))


def first_lines(corpus, folder, lines):
    """A copy of the real corpus's files in `folder`, each cut to its first ``lines[name]`` lines
    (the whole file where `lines` does not name it): the recipes' end-to-end runs on real text,
    in a fraction of the time."""
    folder.mkdir()
    for name in os.listdir(corpus):
        with open(os.path.join(corpus, name), encoding="utf-8") as f:
            kept = f.readlines()[:lines.get(name)]
        (folder / name).write_text("".join(kept), encoding="utf-8")
    return folder


# Real corpora cut for the recipes' end-to-end runs, whose evaluation passes then take seconds
# instead of minutes: PTB's training text whole (its 10k-word vocabulary), WikiText-2's a sixth
# (about 20k words still), valid and test a tenth of each; Multi30k a third of its training pairs
# and a quarter of its test set.
SHORTENED = {"ptb": {"valid.txt": 400, "test.txt": 400},
             "wikitext2": {"train.txt": 6000, "valid.txt": 400, "test.txt": 400},
             "multi30k": {f"{split}.{language}": lines for split, lines in (("train", 10_000), ("test2016", 250))
                          for language in ("de", "en")}}


@pytest.mark.slow
@pytest.mark.parametrize("corpus", ["ptb", "wikitext2"])
def test_lm_recipe_end_to_end_shortened(tmp_path, corpus):
    data = first_lines(shared_corpus(corpus), tmp_path / corpus, SHORTENED[corpus])
    rshare_variant = "rshare-0.1-freq-k4-std0.2-h64-drop0.2-poollr2" if corpus == "ptb" else "rshare-0.1"
    variants = ["dense", rshare_variant]
    recipe("lm.sh", tmp_path, CORPUS=corpus, DATA=data, PRESET="smoke", WORK=tmp_path / "work",
           VARIANTS=" ".join(variants))
    # Far better than chance: a tenth of the uniform perplexity over the vocabulary.
    vocabulary = len(lines_of(tmp_path / "work/data-bin/dict.txt"))
    results = check_results(tmp_path / "work/results", variants, "test_ppl", lambda ppl: ppl < vocabulary / 10)
    rshare = results[variants[1]]
    width = 2 if corpus == "ptb" else 1  # -h64 doubles the smoke model's 32
    assert rshare["embedding_softmax_params"] < 0.15 * width * results["dense"]["embedding_softmax_params"]
    if corpus == "ptb":  # the smoke model is 2x32; -h64 doubles it
        for flag in ("--rshare-frequent-words 500", "--rshare-subvectors 4", "--rshare-init-std 0.2",
                     "--decoder-hidden-size 64", "--dropout 0.2", "--pool-lr-scale 2"):
            assert flag in rshare["command"]
        assert rshare["params"]["body"] > 3 * results["dense"]["params"]["body"]
    assert "--criterion rshare_cross_entropy" in rshare["command"]
    # the device follows the machine: --cpu exactly where torch sees no GPU
    assert (" --cpu " in rshare["command"]) == (not torch.cuda.is_available())
    table = tabulate(tmp_path / "work/results", tmp_path)
    assert f"| {corpus} | smoke | 100 updates | {variants[1]} | test ppl | {rshare['test_ppl']:.2f} |" in table


@pytest.mark.slow
def test_lm_recipe_compresses_its_teacher_and_distils_it(tmp_path):
    data = first_lines(shared_corpus("ptb"), tmp_path / "ptb", SHORTENED["ptb"])
    work = tmp_path / "work"
    student = "rshare-0.1-bias-kmeans-distill"
    failed = recipe("lm.sh", tmp_path, check=False, DATA=data, PRESET="smoke", WORK=work, VARIANTS=student)
    assert failed.returncode == 1 and "train and evaluate its teacher first (VARIANTS=dense)" in failed.stderr
    recipe("lm.sh", tmp_path, DATA=data, PRESET="smoke", WORK=work, VARIANTS=f"dense {student}", STEPS="train evaluate")
    failed = recipe("lm.sh", tmp_path, check=False, DATA=data, PRESET="smoke", WORK=work, VARIANTS=student, SEED="2",
                    STEPS="train")  # seed 2 starts from the teacher's seed-2 run, not from seed 1's
    assert failed.returncode == 1 and "train and evaluate its teacher first (VARIANTS=dense SEED=2)" in failed.stderr
    results = check_results(work / "results", ["dense", student], "test_ppl", lambda ppl: ppl < 1000)
    dense = results["dense"]
    assert dense["stage"] == "scratch" and "teacher" not in dense
    result = results[student]
    assert result["stage"] == "k-means codes + fine-tune + distillation"
    assert result["teacher"] == {"variant": "dense", "test_ppl": dense["test_ppl"], "updates": dense["updates"],
                                 "train_seconds": dense["train_seconds"],
                                 "params": dense["params"]}
    compressed = result["compressed"]
    assert len(compressed["relative_errors"]) == 2 and all(0 < e < 1 for e in compressed["relative_errors"].values())
    assert compressed["valid_ppl"] > 1 and compressed["teacher_valid_ppl"] > 1
    assert compressed["seconds"] == int((work / "compressed" / f"{student}.seconds").read_text())
    table = tabulate(work / "results", tmp_path)
    assert f"| 100 updates | {student} | k-means codes + fine-tune + distillation | dense | {dense['test_ppl']:.2f} |" in table
    assert "--criterion rshare_distill" in result["command"] and "--finetune-from-model" in result["command"]
    log = (work / "compressed" / f"{student}.log").read_text()
    assert log.count("relative error") == 2  # both tables fitted
    # the learned mapping is stored: V x K entries at ceil(log2(M/K)) bits count in the tables
    assert result["embedding_softmax_params"] < 0.25 * dense["embedding_softmax_params"]


@pytest.mark.slow
def test_translation_recipe_end_to_end_shortened(tmp_path):
    data = first_lines(shared_corpus("multi30k"), tmp_path / "multi30k", SHORTENED["multi30k"])
    recipe("translation.sh", tmp_path, DATA=data, PRESET="smoke", WORK=tmp_path / "work", VOCAB="1500")
    # a vocabulary other than the preset's names the results after it
    # 124 updates give 1-2 BLEU, which moves with rounding (0.84 to 2.06 for dense); chance gives 0.
    results = check_results(tmp_path / "work/results", ["dense", "rshare-0.1"], "test_bleu", lambda bleu: bleu > 0.5,
                            checkpoint="checkpoint_average.pt", suffix="-bpe1500")
    symbols = len(lines_of(tmp_path / "work/data-bin/dict.de.txt")) + 4  # and fairseq's special symbols
    assert results["dense"]["vocabulary"] == f"joint sentencepiece bpe 1500, dictionary of {symbols}"
    run = tmp_path / "work/rshare-0.1"
    epochs = [torch.load(run / f"checkpoint{epoch}.pt", weights_only=False)["model"] for epoch in (1, 2)]
    average = torch.load(run / "checkpoint_average.pt", weights_only=False)["model"]
    for key, value in average.items():
        expected = (epochs[0][key] + epochs[1][key]) / 2 if value.is_floating_point() else epochs[1][key]
        assert torch.allclose(value, expected, atol=1e-6) and value.dtype == epochs[1][key].dtype, key
    assert results["rshare-0.1"]["sacrebleu_signature"].startswith("nrefs:1|case:mixed")
    assert len(lines_of(tmp_path / "work/rshare-0.1/test.hyp")) == SHORTENED["multi30k"]["test2016.en"]
    assert "test BLEU" in tabulate(tmp_path / "work/results", tmp_path)


def test_word_level_vocabulary_keeps_whole_words_and_writes_unk_for_the_rest(tmp_path):
    multi30k = shared_corpus("multi30k")
    text = tmp_path / "train.txt"
    text.write_text("".join(line + "\n" for line in lines_of(os.path.join(multi30k, "train.en"))[:3000]))
    result = python_script("subwords.py", "train", "--model-prefix", tmp_path / "word", "--vocab-size", "500",
                           "--model-type", "word", text)
    assert result.returncode == 0, result.stderr
    result = python_script("subwords.py", "encode", "--model", tmp_path / "word.model", "--model-type", "word",
                           text, tmp_path / "out.txt")
    assert result.returncode == 0, result.stderr
    pieces = [line.split() for line in lines_of(tmp_path / "out.txt")]
    originals = [line.split() for line in lines_of(text)]
    assert all(len(p) == len(o) for p, o in zip(pieces, originals))  # one piece per word
    for piece_line, words in zip(pieces, originals):
        for piece, word in zip(piece_line, words):
            assert piece in ("<unk>", "\u2581" + word)
    types = {piece for line in pieces for piece in line}
    assert "<unk>" in types and len(types) <= 500


def test_budget_finds_the_largest_ratio_within_the_dense_runs_total(lm_data):
    model = ["--arch", "rshare_lstm_lm", "--decoder-layers", "2"]
    words = len(open(lm_data / "dict.txt").readlines()) + 4
    dense = budget.total_parameters(str(lm_data), model, "dense-h32", words)
    lstm = 2 * (4 * 32 * (32 + 32) + 2 * 4 * 32)  # two LSTM cells: input and hidden weights, two biases
    assert dense == words * 32 + lstm + (words * 32 + words)  # embedding, LSTM, output layer with its bias
    step = budget.largest_fitting_ratio(lambda step: budget.total_parameters(
        str(lm_data), model, budget.ratio_name("rshare-R-bias-h48", step), words) <= dense)
    fitting = budget.total_parameters(str(lm_data), model, budget.ratio_name("rshare-R-bias-h48", step), words)
    larger = budget.total_parameters(str(lm_data), model, budget.ratio_name("rshare-R-bias-h48", step + 1), words)
    assert fitting <= dense < larger
    assert budget.ratio_name("rshare-R-bias-h48", 250) == "rshare-0.25-bias-h48"


def test_budget_names_a_run_without_its_ratio_placeholder(lm_data):
    result = subprocess.run([sys.executable, "-m", "recipes.budget", str(lm_data), "--dense", "dense",
                             "--rshare", "rshare-0.1-bias"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].endswith("--rshare rshare-0.1-bias: start it with rshare-R "
                                                   "(R stands for the ratio to find)")


def budget_run(lm_data, rshare, flag, fraction, model):
    """The run name recipes.budget prints for `rshare` at `flag fraction` of dense-h32, and its R in grid steps."""
    result = subprocess.run([sys.executable, "-m", "recipes.budget", str(lm_data), "--dense", "dense-h32",
                             "--rshare", rshare, flag, fraction, "--", *model],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    name = result.stdout.split("\t")[0]
    return name, round(float(name.split("-")[1]) * budget.GRID)


def test_budget_of_tables_fits_a_fraction_of_the_dense_tables_learned_codes_counted(lm_data):
    model = ["--arch", "rshare_lstm_lm", "--decoder-layers", "2"]
    words = len(open(lm_data / "dict.txt").readlines()) + 4
    dense = budget.table_parameters(str(lm_data), model, "dense-h32", words)
    assert dense == words * 32 + (words * 32 + words)  # embedding, output layer with its bias
    name, step = budget_run(lm_data, "rshare-R-bias-kmeans-h32", "--tables", "0.1", model)
    fitting = budget.table_parameters(str(lm_data), model, name, words)
    larger = budget.table_parameters(str(lm_data), model, budget.ratio_name("rshare-R-bias-kmeans-h32", step + 1), words)
    assert fitting <= 0.1 * dense < larger
    # the stored codes count: the same ratio with the regenerated mapping has fewer
    assert budget.table_parameters(str(lm_data), model, name.replace("-kmeans", ""), words) < fitting


def test_budget_of_input_tables_leaves_the_output_layer_out(lm_data):
    model = ["--arch", "rshare_lstm_lm", "--decoder-layers", "2"]
    words = len(open(lm_data / "dict.txt").readlines()) + 4
    assert budget.input_table_parameters(str(lm_data), model, "dense-h32", words) == words * 32
    name, step = budget_run(lm_data, "rshare-R-input-k4-kmeans-h32", "--input-tables", "0.05", model)
    counts = budget.parameters(str(lm_data), model, name, words)
    larger = budget.parameters(str(lm_data), model, budget.ratio_name("rshare-R-input-k4-kmeans-h32", step + 1), words)
    assert counts["input"] <= 0.05 * words * 32 < larger["input"]
    assert counts["output"] == words * 32 + words  # the dense output layer, not in the budget
    result = subprocess.run([sys.executable, "-m", "recipes.budget", str(lm_data), "--dense", "dense-h32",
                             "--rshare", "rshare-R-input", "--tables", "0.1", "--input-tables", "0.01"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and "not allowed with argument" in result.stderr.splitlines()[-1]


def test_budget_of_translation_tables_counts_the_one_shared_table(nmt_data):
    model = ["--arch", "rshare_transformer", "--encoder-layers", "1", "--decoder-layers", "1",
             "--encoder-embed-dim", "32", "--decoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
             "--decoder-ffn-embed-dim", "64", "--encoder-attention-heads", "2", "--decoder-attention-heads", "2"]
    words = len(open(nmt_data / "dict.de.txt").readlines()) + 4
    dense = budget.table_parameters(str(nmt_data), model, "dense", words, "translation")
    assert dense == words * 32  # --share-all-embeddings: one table for both inputs and the output
    result = subprocess.run([sys.executable, "-m", "recipes.budget", str(nmt_data), "--recipe", "translation",
                             "--dense", "dense", "--rshare", "rshare-R-kmeans", "--tables", "0.1", "--", *model],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    name = result.stdout.split("\t")[0]
    step = round(float(name.split("-")[1]) * budget.GRID)
    fitting = budget.table_parameters(str(nmt_data), model, name, words, "translation")
    larger = budget.table_parameters(str(nmt_data), model, budget.ratio_name("rshare-R-kmeans", step + 1), words,
                                     "translation")
    assert fitting <= 0.1 * dense < larger


def test_curves_are_those_of_the_runs_best_at_each_budget_that_kept_one(tmp_path):
    def run(variant, ppl, total, seed=1, curve=((100, 300.0), (200, 200.0))):
        return {"corpus": "ptb", "preset": "cpu", "variant": variant, "seed": seed, "test_ppl": ppl,
                "params": {"input": total - 5, "output": 0, "body": 5}, "embedding_softmax_params": total - 5,
                "words_per_second": 1.0, "train_seconds": 1.0, "checkpoint_bytes": 1, "stage": "scratch",
                "valid_curve": [list(point) for point in curve]}
    results = [run("dense-h100", 120.0, 100), run("dense-h200", 110.0, 200), run("dense-h150", 125.0, 150),
               run("rshare-0.5", 115.0, 90), run("rshare-0.5", 116.0, 90, seed=2),
               run("rshare-0.9-h300", 100.0, 300), run("rshare-0.1", 90.0, 50, curve=())]
    chosen = results_table.curve_runs(results)
    # dense-h150 loses to the smaller dense-h100; rshare-0.1 kept no curve; both seeds of rshare-0.5
    assert [(r["variant"], r["seed"]) for r in chosen["ptb", "cpu", "no limit"]] == [
        ("rshare-0.5", 1), ("rshare-0.5", 2), ("dense-h100", 1), ("dense-h200", 1), ("rshare-0.9-h300", 1)]
    folder = tmp_path / "results"
    folder.mkdir()
    for index, result in enumerate(results):
        (folder / f"{index}.json").write_text(json.dumps(result))
    assert python_script("results_table.py", folder, "--markdown", tmp_path / "r.md", "--compression-plot",
                         tmp_path / "c.png", "--budget-plot", tmp_path / "b.png", "--curves-plot",
                         tmp_path / "v.png").returncode == 0
    assert (tmp_path / "v.png").stat().st_size > 1000
    (folder / "7.json").write_text(json.dumps(run("dense", 100.0, 10, curve=())))
    for index in range(6):
        (folder / f"{index}.json").unlink()
    refused = [tmp_path / name for name in ("r2.md", "c2.png", "b2.png", "v2.png")]
    failed = python_script("results_table.py", folder, "--markdown", refused[0], "--compression-plot", refused[1],
                           "--budget-plot", refused[2], "--curves-plot", refused[3])
    assert failed.returncode == 1 and failed.stderr.strip().endswith("leave out --curves-plot")
    assert not any(path.exists() for path in refused)  # refused before writing anything
