"""Every GPU measurement in one command with a hard time budget, for a machine that has a CUDA
GPU, no network and no fairseq: its wheels (benchmarks/gpu_prepare.sh downloads them) and the
corpora travel with the repository.

    python3 benchmarks/gpu_session.py --out DIR [--wheels .whl] [--data .gpu-data] [--budget 540]
    python3 benchmarks/gpu_session.py --out DIR --cpu-smoke      # the same parts, tiny, on the CPU

Parts, in order, each in its own process group under its own time cap (one whose cap runs out
is stopped and recorded as such, with what it had written):
  tests      pytest of the device-parametrised tests on the GPU (tests/test_devices.py,
             tests/test_output_path.py; -k cuda)
  layers     the output layer with its loss, dense against rshare's two paths, at V = 33k, 100k,
             800k, H = 512, 1024, tables at 1 % and 10 %: median time (CUDA events) and peak
             memory (torch.cuda.max_memory_allocated), and the path `auto` picks
  precision  the LM recipe's gpu model on PTB, the same updates in float32, --fp16 and --bf16 at
             once: the losses, inf/NaN, the largest gap to float32
  speed      fairseq-train words/s at the recipes' gpu presets (lm.sh on PTB, translation.sh on
             Multi30k), dense against rshare
  vocabulary the largest vocabulary whose LSTM LM (1x512, 700 tokens a batch, Adam) trains on the
             GPU, dense against rshare at 1 %, by doubling
  recipes    lm.sh runs in parallel until the budget ends (--stop-time-hours), then evaluated:
             the tied same-budget pairs (ratios by recipes.budget) on WikiText-2, then on PTB
             with seeds 1 and 2
Writes PART.json for each part and logs.tar.gz (every log) into --out: at most 8 files.
"""
import argparse
import contextlib
import glob
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PARTS = ("tests", "layers", "precision", "speed", "vocabulary", "recipes")
# Seconds each part may take at most (recipes: whatever is left).
CAPS = {"tests": 120, "layers": 75, "precision": 60, "speed": 140, "vocabulary": 40, "recipes": 0}
SMOKE_CAPS = {"tests": 60, "layers": 30, "precision": 75, "speed": 90, "vocabulary": 20, "recipes": 0}
# Relative gap of a lower precision's mean loss over its last logged updates to float32's, at most.
PRECISION_TOLERANCE = 0.02
# The same-budget curves, tied against tied: each dense run beside the rshare run whose table
# ratio R recipes.budget finds on the corpus at hand (its total at or below the dense one's).
# Every run names its width, so the cpu preset's architecture counts them for any preset.
SAME_BUDGET_PAIRS = [("dense-tied-h150-drop0.3", "rshare-R-bias-scale-tied-h200-drop0.3"),
                     ("dense-tied-h200-drop0.3", "rshare-R-bias-scale-tied-h320-drop0.3"),
                     ("dense-tied-h400-drop0.3", "rshare-R-bias-scale-tied-h560-drop0.3")]
BUDGET_MODEL = ["--arch", "rshare_lstm_lm_ptb_small"]
PARALLEL_RUNS = 12


class Session:
    """Where the session writes and what it runs with: the output folder, the work folder, the
    corpora, the device, and the environment of its child processes."""

    def __init__(self, args):
        self.out, self.smoke = os.path.abspath(args.out), args.cpu_smoke
        self.work = os.path.abspath(args.work)
        self.logs = os.path.join(self.work, "logs")
        os.makedirs(self.logs, exist_ok=True)
        os.makedirs(self.out, exist_ok=True)
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
            [REPO] + ([args.site] if args.site else []) + [os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        if args.site:
            self.env["PATH"] = os.path.join(args.site, "bin") + os.pathsep + os.environ["PATH"]
        if self.smoke:
            self.env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
        self.data = args.data

    def write(self, part, result):
        with open(os.path.join(self.out, f"{part}.json"), "w") as f:
            json.dump(result, f, indent=1)

    def read(self, part):
        path = os.path.join(self.out, f"{part}.json")
        return json.load(open(path)) if os.path.exists(path) else {}


# ---- the parent: installs, unpacks, runs each part under its cap ----

def install_wheels(wheels, site):
    """pip install the carried wheels (no index, no dependencies: torch stays the machine's)."""
    found = sorted(glob.glob(os.path.join(wheels, "*.whl")))
    if not found:
        raise SystemExit(f"gpu_session.py: no wheels in {wheels}: run benchmarks/gpu_prepare.sh first")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", site, *found], check=True)


def run_part(session, part, cap, args):
    """Run one part in its own process group for at most `cap` seconds; record how it ended."""
    command = [sys.executable, __file__, "--part", part, "--out", session.out, "--work", session.work,
               "--data", session.data, "--deadline", str(time.time() + cap)]
    if session.smoke:
        command.append("--cpu-smoke")
    if args.site:
        command += ["--site", args.site]
    start = time.time()
    with open(os.path.join(session.logs, f"{part}.log"), "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=session.env,
                                   start_new_session=True)
        try:
            status = process.wait(timeout=cap)
            ending = "done" if status == 0 else f"failed (exit status {status})"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            ending = f"stopped at its cap of {cap:.0f} s"
    result = session.read(part)
    result.update(part=part, ending=ending, seconds=round(time.time() - start, 1), cap_seconds=round(cap))
    session.write(part, result)
    print(f"{part}: {ending} in {result['seconds']} s", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the results (at most 8 files)")
    parser.add_argument("--work", default="/tmp/rshare-gpu-session", help="scratch folder")
    parser.add_argument("--wheels", help="folder of wheels to install first (fairseq and its missing dependencies)")
    parser.add_argument("--site", help=argparse.SUPPRESS)
    parser.add_argument("--data", default=os.environ.get("RSHARE_DATA", os.path.join(REPO, "..", "shared", "data")),
                        help="folder of the corpora (ptb, wikitext2, multi30k)")
    parser.add_argument("--budget", type=float, default=540, help="seconds the whole session may take")
    parser.add_argument("--only", action="append", choices=PARTS, help="run only this part (repeatable)")
    parser.add_argument("--cap", action="append", default=[], metavar="PART=SECONDS", help="another cap for a part")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU, the GPU hidden")
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.data = os.path.abspath(args.data)
    if args.part:
        return PART_FUNCTIONS[args.part](Session(args), args.deadline)
    start = time.time()
    if args.wheels:
        args.site = os.path.join(os.path.abspath(args.work), "site")
        install_wheels(args.wheels, args.site)
    session = Session(args)
    caps = dict(SMOKE_CAPS if args.cpu_smoke else CAPS)
    for setting in args.cap:
        part, seconds = setting.split("=")
        caps[part] = float(seconds)
    for part in args.only or PARTS:
        left = args.budget - (time.time() - start) - 15  # 15 s to pack the logs
        cap = min(caps[part] or left, left)
        if cap < 10:
            session.write(part, {"part": part, "ending": "not run: the budget was spent"})
            continue
        run_part(session, part, cap, args)
    with tarfile.open(os.path.join(session.out, "logs.tar.gz"), "w:gz") as tar:
        tar.add(session.logs, arcname="logs")
    print(f"session: {time.time() - start:.0f} s; results in {session.out}", flush=True)


# ---- the parts (each runs in its own process) ----

def device(session):
    import torch
    return "cuda" if torch.cuda.is_available() and not session.smoke else "cpu"


def part_tests(session, deadline):
    """pytest -k on the device: the CUDA tests on a GPU, the CPU's fast ones in the smoke run."""
    selection = ["-m", "not slow", "-k", "cpu"] if session.smoke else ["-k", "cuda"]
    parallel = ["-n", "0"] if session.smoke else ["-n", "4"]
    log = os.path.join(session.logs, "pytest.log")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *parallel,
               *selection, os.path.join(REPO, "tests", "test_devices.py"), os.path.join(REPO, "tests", "test_output_path.py")]
    with open(log, "w") as f:
        status = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                                env=dict(session.env, RSHARE_DATA=session.data, RSHARE_REQUIRE_DATA="1")).returncode
    text = open(log).read()
    summary = re.findall(r"^=*\s*(\d+ (?:passed|failed).*?)\s*=*$", text, re.M)
    session.write("tests", {"command": " ".join(command[1:]), "exit_status": status,
                            "summary": summary[-1] if summary else None,
                            "failed": re.findall(r"^FAILED (\S+)", text, re.M)})


def timed(step, on_gpu, repeats):
    """(median seconds, peak MB) of step() after one warm-up; the peak counts what the step
    allocates on top of what was there (GPU only)."""
    import torch
    step()
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        if on_gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            begin = time.perf_counter()
            step()
            times.append(time.perf_counter() - begin)
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20 if on_gpu else None
    return statistics.median(times), peak


def output_layer_row(V, H, ratio, tokens, where, repeats):
    """One grid cell: dense, rshare through each path, and auto's pick."""
    import torch
    import torch.nn.functional as F
    from fairseq_rshare.mapping import pool_size_of_ratio
    from fairseq_rshare.modules import RandomSharedEmbedding, RandomSharedOutput

    on_gpu = where == "cuda"
    torch.manual_seed(0)
    features = torch.randn(tokens, H, device=where, requires_grad=True)
    targets = torch.randint(V, (tokens,), device=where)
    row = {"V": V, "H": H, "ratio": ratio, "tokens": tokens}
    dense = torch.nn.Linear(H, V, bias=False).to(where)

    def dense_step():
        F.cross_entropy(dense(features), targets).backward()
        dense.zero_grad(set_to_none=True)

    cases = {"dense": dense_step}
    table = RandomSharedEmbedding(V, H, 1, 8, pool_size_of_ratio(V, 8, ratio))
    rshare = RandomSharedOutput(table, path="auto").to(where).train()

    def rshare_step(path):
        def step():
            if path == "pool-scores":
                loss = rshare.loss(features, targets)[0] / tokens
            else:
                loss = F.nll_loss(rshare.materialized_forward(features), targets)
            loss.backward()
            rshare.zero_grad(set_to_none=True)
        return step

    cases.update({"rshare pool-scores": rshare_step("pool-scores"), "rshare materialize": rshare_step("materialize")})
    for name, step in cases.items():
        try:
            seconds, peak = timed(step, on_gpu, repeats)
            row[name] = {"ms": round(1000 * seconds, 3), "peak_mb": peak and round(peak, 1)}
        except torch.OutOfMemoryError:
            row[name] = {"error": "out of memory"}
        features.grad = None
        if on_gpu:
            torch.cuda.empty_cache()
    del dense
    try:
        rshare(features.detach())  # auto times both paths on the first training call
        row["auto"] = rshare.path
    except torch.OutOfMemoryError:
        row["auto"] = "out of memory"
    for name in ("rshare pool-scores", "rshare materialize"):
        if "ms" in row["dense"] and "ms" in row[name]:
            row[name]["speedup"] = round(row["dense"]["ms"] / row[name]["ms"], 2)
    return row


def part_layers(session, deadline):
    import torch
    where = device(session)
    if session.smoke:
        grid, tokens, repeats = [(2000, 64, 0.1), (4000, 64, 0.01)], 64, 2
    else:
        grid = [(V, H, ratio) for ratio in (0.01, 0.1) for H in (512, 1024) for V in (33_278, 100_000, 800_000)]
        tokens, repeats = 4096, 5
    result = {"device": torch.cuda.get_device_name() if where == "cuda" else "cpu", "torch": torch.__version__,
              "K": 8, "tokens": tokens, "repeats": repeats, "loss": "cross-entropy, mean over tokens, float32",
              "rows": []}
    for V, H, ratio in grid:
        result["rows"].append(output_layer_row(V, H, ratio, tokens, where, repeats))
        session.write("layers", result)


def recipe(session, script, corpus, variant, work, steps, preset, extra="", seed=1, data=None):
    """Start recipes/SCRIPT for one run (its own WORK, a data-bin linked from the corpus's
    prepared one); return the Popen."""
    os.makedirs(work, exist_ok=True)
    prepared = os.path.join(session.work, f"prepared-{script}-{corpus}-{preset}", "data-bin")
    if "prepare" not in steps and not os.path.exists(os.path.join(work, "data-bin")):
        os.symlink(prepared, os.path.join(work, "data-bin"))
    if session.smoke:
        extra += " --batch-size 4"  # smoke: small steps, also for the stateful streams
    env = dict(session.env, CORPUS=corpus, PRESET=preset, VARIANTS=variant, WORK=work, STEPS=steps,
               EXTRA=extra, SEED=str(seed), DATA=data or os.path.join(session.data, corpus), RSHARE_DATA=session.data)
    log = open(os.path.join(work, "recipe.log"), "w")
    return subprocess.Popen(["bash", os.path.join(REPO, "recipes", script)], stdout=log, stderr=subprocess.STDOUT,
                            env=env)


def prepare(session, script, corpus, preset):
    """The corpus's data-bin, made once by the recipe's prepare step."""
    work = os.path.join(session.work, f"prepared-{script}-{corpus}-{preset}")
    if not os.path.exists(os.path.join(work, "data-bin")):
        status = recipe(session, script, corpus, "dense", work, "prepare", preset, data=corpus_folder(session, corpus)).wait()
        if status:
            raise RuntimeError(f"{script} prepare of {corpus} failed: see {work}/recipe.log")
    return work


def corpus_folder(session, corpus):
    """The corpus, or in the smoke run its first lines (the same for every part)."""
    full = os.path.join(session.data, corpus)
    if not session.smoke:
        return full
    small = os.path.join(session.work, "smoke-data", corpus)
    if not os.path.isdir(small):
        os.makedirs(small)
        for name in os.listdir(full):
            if name.endswith((".txt", ".de", ".en")):
                with open(os.path.join(full, name)) as fin, open(os.path.join(small, name), "w") as fout:
                    fout.writelines(line for _, line in zip(range(1000 if "train" in name else 100), fin))
    return small


def train_log(work, variant, seed=1):
    from recipes.variants import seeded
    path = os.path.join(work, seeded(variant, seed), "train.log")
    return open(path).read() if os.path.exists(path) else ""


def keep_logs(session, folder, name):
    """Copy the folder's logs (not its checkpoints) into the session's logs."""
    for path in glob.glob(os.path.join(folder, "**", "*.log"), recursive=True) + glob.glob(
            os.path.join(folder, "results", "*.json")):
        target = os.path.join(session.logs, name, os.path.relpath(path, folder))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy(path, target)


def losses_of(log):
    return [float(loss) for loss in re.findall(r"train_inner \| .*? loss=([^,]+),", log)]


def part_precision(session, deadline):
    preset, updates = ("smoke", 10) if session.smoke else ("gpu", 300)
    prepare(session, "lm.sh", "ptb", preset)
    flags = {"float32": "", "float16": "--fp16", "bfloat16": "--bf16"}
    runs = {}
    for dtype, flag in flags.items():
        work = os.path.join(session.work, f"precision-{dtype}")
        runs[dtype] = work, recipe(session, "lm.sh", "ptb", "rshare-0.1-bias", work, "train", preset,
                                   f"--max-update {updates} --log-interval {updates // 10} {flag}")
    result = {"preset": preset, "variant": "rshare-0.1-bias", "updates": updates, "tolerance": PRECISION_TOLERANCE,
              "tolerance_means": "relative gap of the mean loss over the last 5 logged intervals to float32's",
              "log_interval": updates // 10,
              "runs": {}}
    for dtype, (work, process) in runs.items():
        status = process.wait()
        log = train_log(work, "rshare-0.1-bias")
        losses = losses_of(log)
        run = {"exit_status": status, "losses": losses,
               "finite": bool(losses) and all(math.isfinite(loss) for loss in losses)}
        if status:
            text = log + open(os.path.join(work, "recipe.log")).read()  # the training's own error first
            run["error"] = next((line for line in text.splitlines() if "error" in line.lower()), "")[-300:]
        result["runs"][dtype] = run
        keep_logs(session, work, f"precision-{dtype}")
    reference = result["runs"]["float32"]["losses"][-5:]
    for dtype, run in result["runs"].items():
        tail = run["losses"][-5:]
        if dtype != "float32" and tail and reference and run["finite"]:
            gap = abs(statistics.mean(tail) - statistics.mean(reference)) / statistics.mean(reference)
            run.update(gap_to_float32=round(gap, 4), within_tolerance=gap <= PRECISION_TOLERANCE)
    session.write("precision", result)


def part_speed(session, deadline):
    from bench_training import steady_training_speed
    from fairseq_rshare.tools import training_speed

    preset = "smoke" if session.smoke else "gpu"
    updates = 10 if session.smoke else 200
    cases = [("lm.sh", "ptb", ["dense", "rshare-0.1-bias"]),
             ("translation.sh", "multi30k", ["dense", "rshare-0.1"])]
    if session.smoke:
        cases = [(script, corpus, variants[1:2]) for script, corpus, variants in cases]
    result = {"preset": preset, "updates": updates, "runs": []}
    for script, corpus, variants in cases:
        try:
            prepare(session, script, corpus, preset)
        except RuntimeError as error:
            result["runs"].append({"script": script, "error": str(error)})
            continue
        for variant in variants:  # one at a time: the GPU to itself
            work = os.path.join(session.work, f"speed-{script}-{variant}")
            status = recipe(session, script, corpus, variant, work, "train", preset,
                            f"--max-update {updates} --log-interval 10 --no-save").wait()
            log = train_log(work, variant)
            run = {"script": script, "corpus": corpus, "variant": variant, "exit_status": status,
                   "updates": training_speed(log)[0], "words_per_second": round(training_speed(log)[1], 1),
                   "steady_words_per_second": steady_training_speed(log)}
            result["runs"].append(run)
            keep_logs(session, work, f"speed-{script}-{variant}")
            session.write("speed", result)
    session.write("speed", result)


def trains(V, ratio, where, H, tokens=700):
    """Whether two Adam steps of a 1xH LSTM LM over V words run, and their peak MB on a GPU;
    dense when ratio is None, else rshare tables at `ratio` with the loss from the pool scores."""
    import torch
    import torch.nn.functional as F
    from fairseq_rshare.mapping import pool_size_of_ratio
    from fairseq_rshare.modules import RandomSharedEmbedding, RandomSharedOutput

    model = None
    try:
        if ratio is None:
            model = torch.nn.ModuleDict({"input": torch.nn.Embedding(V, H), "lstm": torch.nn.LSTM(H, H),
                                         "output": torch.nn.Linear(H, V)})
        else:
            table = lambda: RandomSharedEmbedding(V, H, 1, 8, pool_size_of_ratio(V, 8, ratio))  # noqa: E731
            model = torch.nn.ModuleDict({"input": table(), "lstm": torch.nn.LSTM(H, H),
                                         "output": RandomSharedOutput(table(), path="pool-scores")})
        model.to(where)
        optimizer = torch.optim.Adam(model.parameters())
        tokens_in = torch.randint(V, (tokens // 20, 20), device=where)
        if where == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(2):
            hidden = model["lstm"](model["input"](tokens_in))[0].reshape(-1, H)
            targets = tokens_in.reshape(-1)
            if ratio is None:
                loss = F.cross_entropy(model["output"](hidden), targets)
            else:
                loss = model["output"].loss(hidden, targets)[0] / tokens
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return True, torch.cuda.max_memory_allocated() / 2**20 if where == "cuda" else None
    except torch.OutOfMemoryError:
        return False, None
    finally:
        del model
        if where == "cuda":
            torch.cuda.empty_cache()


def part_vocabulary(session, deadline):
    import torch
    where = device(session)
    start, limit, H = (2000, 8000, 64) if session.smoke else (1_000_000, 2**28, 512)
    result = {"device": where, "model": f"1x{H} LSTM LM, 700 tokens a batch, Adam, two steps, float32",
              "K": 8, "rshare_ratio": 0.01, "tries": []}
    for name, ratio in (("dense", None), ("rshare 1 %", 0.01)):
        V = start
        while V <= limit and time.time() < deadline - 5:
            ran, peak = trains(V, ratio, where, H)
            result["tries"].append({"model": name, "V": V, "trains": ran, "peak_mb": peak and round(peak)})
            if ran:
                result[f"largest {name}"] = V
            session.write("vocabulary", result)
            if not ran:
                break
            V *= 2
    if where == "cuda":
        result["gpu_memory_mb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**20)
    session.write("vocabulary", result)


def part_recipes(session, deadline):
    """lm.sh runs in parallel, each told to stop training in time to be evaluated by the deadline."""
    from recipes.variants import seeded
    preset = "smoke" if session.smoke else "cpu"
    # WikiText-2's pairs, then PTB's with seeds 1 and 2; the smoke run, PTB's first pair.
    plan = [("ptb", 1, 1)] if session.smoke else [("wikitext2", 3, 1), ("ptb", 3, 1), ("ptb", 3, 2)]
    pairs_of = {corpus: SAME_BUDGET_PAIRS[:pairs] for corpus, pairs, _ in plan}
    searches = {(corpus, dense, rshare): same_budget_search(session, prepare(session, "lm.sh", corpus, preset),
                                                           dense, rshare)
                for corpus, pairs in pairs_of.items() for dense, rshare in pairs}
    found = {key: same_budget_run(key, search) for key, search in searches.items()}
    runs = [(corpus, name, seed) for corpus, pairs, seed in plan for dense, rshare in SAME_BUDGET_PAIRS[:pairs]
            for name in (dense, found[corpus, dense, rshare])][:PARALLEL_RUNS]
    evaluation_seconds = 20 if session.smoke else 60
    hours = max(deadline - time.time() - evaluation_seconds - 30, 10) / 3600
    extra = f"--stop-time-hours {hours:.4f}" + (" --max-update 10" if session.smoke else "")
    started = []
    for corpus, variant, seed in runs:
        work = os.path.join(session.work, f"recipes-{corpus}")
        started.append((corpus, variant, seed, work, recipe(session, "lm.sh", corpus, variant, work, "train evaluate",
                                                            preset, extra, seed)))
    result = {"preset": preset, "stop_time_hours": round(hours, 4), "runs": []}
    for corpus, variant, seed, work, process in started:
        status = process.wait()
        record = os.path.join(work, "results", f"{seeded(variant, seed)}.json")
        log = train_log(work, variant, seed)
        run = {"corpus": corpus, "variant": variant, "seed": seed, "exit_status": status,
               "updates": (re.findall(r"num_updates[ =](\d+)", log) or [None])[-1],
               "valid_ppl": [float(p) for p in re.findall(r"\| valid \| .*?\| ppl ([\d.]+)", log)]}
        if os.path.exists(record):
            run["result"] = json.load(open(record))
        result["runs"].append(run)
    for corpus in {corpus for corpus, _, _ in runs}:
        keep_logs(session, os.path.join(session.work, f"recipes-{corpus}"), f"recipes-{corpus}")
    session.write("recipes", result)


def same_budget_search(session, prepared, dense, rshare):
    """Start recipes.budget on a prepared corpus: the rshare run with the largest ratio whose total
    fits the dense run's.  Returns the Popen (the searches run side by side)."""
    return subprocess.Popen([sys.executable, "-m", "recipes.budget", os.path.join(prepared, "data-bin"), "--dense",
                             dense, "--rshare", rshare, "--", *BUDGET_MODEL], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=session.env, cwd=REPO)


def same_budget_run(key, search):
    """The run name a search found."""
    out, err = search.communicate()
    if search.returncode:
        last = (err.strip().splitlines() or [f"exit status {search.returncode}"])[-1]
        raise RuntimeError(f"recipes.budget {' '.join(key)} failed: {last}")
    return out.split()[0]


PART_FUNCTIONS = {"tests": part_tests, "layers": part_layers, "precision": part_precision, "speed": part_speed,
                  "vocabulary": part_vocabulary, "recipes": part_recipes}

if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
