"""Turn the recipes' results JSONs into markdown tables and figures.

Runs are grouped by (corpus, preset, schedule: the command's --max-epoch or --max-update). The
runs of one variant with different seeds (the JSON's ``seed``, 1 when absent) are one point:
their mean, with the lowest and highest as its spread, whatever precision each seed trained in
(PTB's check, ptb-stateful-cpu-bf16, measured bf16 within float32's seed spread); the schedule
column names each precision other than float32 (--bf16, --fp16) that a point's seeds used.
The table gives each point's embedding+softmax parameters as a fraction of dense's, and its
metric's change from dense; a second table compares the runs that start from a trained dense
model with that model, their teacher. Each figure answers one question, one panel per group:

- ``--compression-plot``: what compression costs, the metric against the embedding+softmax
  parameters;
- ``--budget-plot``: what wins at a budget, the metric against all parameters;
- ``--curves-plot`` (optional): had the runs converged? The validation curves of the runs best
  at each budget, among those whose JSON kept one.

In the first two, a line joins the dense points, and another the rshare points, that beat every
point of their kind with no more parameters (the best model of each kind at each budget); only
those points are labelled. Error bars are the seed spread.
"""
import argparse
import glob
import itertools
import json
import os
import re
import statistics
import sys

try:
    import matplotlib
except ImportError:
    sys.exit('results_table: error: matplotlib not found: pip install torch==2.13.0 -e ".[recipes]" (in this repository)')

METRICS = {"test_ppl": "test ppl", "test_bleu": "test BLEU"}


def load(paths):
    results = []
    for path in paths:
        files = sorted(glob.glob(os.path.join(path, "*.json"))) if os.path.isdir(path) else [path]
        for file in files:
            with open(file) as f:
                try:
                    results.append(json.load(f))
                except json.JSONDecodeError as error:
                    sys.exit(f"results_table: error: {file} is not valid JSON ({error})")
    if not results:
        sys.exit("results_table: error: no results JSON found in " + ", ".join(paths))
    return results


def metric_of(result):
    return next(key for key in METRICS if key in result)


def total_params(run):
    return sum(run["params"].values())


def schedule(result):
    """How long the run's command trains: its last --max-epoch, else its last --max-update."""
    command = result.get("command", "")
    length = "no limit"
    for flag, unit in (("--max-epoch", "epochs"), ("--max-update", "updates")):
        found = re.findall(rf"{flag}[ =](\d+)", command)
        if found:
            length = f"{found[-1]} {unit}"
            break
    return length


def precision(result):
    """The run's training precision: bf16 or fp16 where its command asks for it, else float32."""
    command = result.get("command", "")
    return next((flag for flag in ("bf16", "fp16") if re.search(rf"--{flag}(\s|$)", command)), "float32")


def schedule_text(schedule, precisions):
    """A schedule with the precisions its runs trained in, where any is not float32."""
    precisions = sorted(set(precisions))
    return schedule if precisions == ["float32"] else f"{schedule}, {'/'.join(precisions)}"


def points(results):
    """One point per (corpus, preset, schedule, variant): the seeds' runs, their mean and spread."""
    by_variant = {}
    for result in results:
        key = (result["corpus"], result["preset"], schedule(result), result["variant"])
        by_variant.setdefault(key, []).append(result)
    merged = []
    for (corpus, preset, trained, variant), runs in by_variant.items():
        metric = metric_of(runs[0])
        seeds = sorted(run.get("seed", 1) for run in runs)
        if len(set(seeds)) != len(seeds):
            sys.exit(f"results_table: error: {corpus} {preset} {variant} has two results of seed "
                     f"{next(s for s in seeds if seeds.count(s) > 1)}: tabulate a rerun (in another "
                     "precision, say) apart from the run it repeats")
        if len({total_params(run) for run in runs}) > 1:
            sys.exit(f"results_table: error: the seeds of {corpus} {preset} {variant} differ in parameters")
        point = {
            **runs[0], "schedule": trained, "precisions": sorted({precision(run) for run in runs}),
            **over_seeds([run[metric] for run in runs], metric, seeds),
            "words_per_second": statistics.mean(run["words_per_second"] for run in runs),
            "train_seconds": statistics.mean(run["train_seconds"] for run in runs),
        }
        if "teacher" in point:  # each seed started from its own seed's teacher: compare means with means
            point["teacher"] = {**point["teacher"],
                                **over_seeds([run["teacher"][metric] for run in runs], metric, seeds)}
            compressed = [run.get("compressed", {}) for run in runs]
            if all("valid_ppl" in scores for scores in compressed):
                point["compressed"] = {**compressed[0], **{
                    key: statistics.mean(scores[key] for scores in compressed)
                    for key in ("valid_ppl", "teacher_valid_ppl")}}
        merged.append(point)
    return merged


def over_seeds(values, metric, seeds):
    """The seeds' values of a metric as one point's: their mean, lowest and highest."""
    return {metric: statistics.mean(values), "low": min(values), "high": max(values), "seeds": seeds}


def groups(merged, by_schedule=True):
    """The points by (corpus, preset, schedule), or by (corpus, preset) without `by_schedule`."""
    grouped = {}
    for point in merged:
        key = (point["corpus"], point["preset"]) + ((point["schedule"],) if by_schedule else ())
        grouped.setdefault(key, []).append(point)
    for group in grouped.values():
        group.sort(key=lambda p: (p["variant"] != "dense", p["schedule"], -p["embedding_softmax_params"], p["variant"]))
    return grouped


def value_text(point, metric):
    if len(point["seeds"]) == 1:
        return f"{point[metric]:.2f}"
    return f"{point[metric]:.2f} ({point['low']:.2f}–{point['high']:.2f}, {len(point['seeds'])} seeds)"


def markdown(results):
    lines = [
        "| corpus | preset | schedule | run | metric | value | vs dense | emb+softmax params | of dense "
        "| other params | total params | checkpoint MB | train words/s | train min |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (corpus, preset), group in groups(points(results), by_schedule=False).items():
        for point in group:
            # dense under the same schedule where there is one, else under another (both are shown)
            dense = min((p for p in group if p["variant"] == "dense"), default=None,
                        key=lambda p: p["schedule"] != point["schedule"])
            metric = metric_of(point)
            change = fraction = "–"
            if dense is not None and metric in dense:
                change = f"{point[metric] - dense[metric]:+.2f}" if metric == "test_bleu" else \
                    f"{100 * (point[metric] / dense[metric] - 1):+.1f} %"
                fraction = f"{100 * point['embedding_softmax_params'] / dense['embedding_softmax_params']:.1f} %"
            trained = schedule_text(point["schedule"], point["precisions"])
            lines.append(
                f"| {corpus} | {preset} | {trained} | {point['variant']} | {METRICS[metric]} "
                f"| {value_text(point, metric)} "
                f"| {change} | {point['embedding_softmax_params']:,} | {fraction} "
                f"| {point['params']['body']:,} | {total_params(point):,} | {point['checkpoint_bytes'] / 1e6:.1f} "
                f"| {point['words_per_second']:,.0f} | {point['train_seconds'] / 60:.1f} |"
            )
    return "\n".join(lines) + "\n" + teacher_markdown(results)


def teacher_markdown(results):
    """A second table for the runs that start from a trained dense model (their teacher): the
    teacher's score beside theirs, their compressed tables' size as a fraction of the same tables
    of the teacher's (the tables whose size changed: an input table compressed alone is not
    diluted by the dense output layer it kept), the compressed model's validation perplexity before
    fine-tuning, and the updates of each stage ("" when no run has a teacher); over seeds, the means
    of the students' and of their teachers' (each seed has its own teacher). Updates, not minutes:
    a run resumed across stops, on shared cores, has no meaningful wall time, and an update's cost
    per stage is benchmarks/bench_stages.py's."""
    students = [point for point in points(results) if "teacher" in point]
    if not students:
        return ""
    lines = [
        "\nRuns that start from a trained dense model, their teacher:\n",
        "| corpus | preset | schedule | run | stage | teacher | teacher value | value | vs teacher "
        "| compressed tables of teacher's | valid ppl compressed (teacher) | teacher updates | own updates |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for point in sorted(students, key=lambda p: (p["corpus"], p["preset"], p["variant"])):
        metric, teacher = metric_of(point), point["teacher"]
        change = f"{point[metric] - teacher[metric]:+.2f}" if metric == "test_bleu" else \
            f"{100 * (point[metric] / teacher[metric] - 1):+.1f} %"
        compressed = point.get("compressed", {})
        before = f"{compressed['valid_ppl']:.2f} ({compressed['teacher_valid_ppl']:.2f})" \
            if "valid_ppl" in compressed else "–"
        trained = schedule_text(point["schedule"], point["precisions"])
        lines.append(
            f"| {point['corpus']} | {point['preset']} | {trained} | {point['variant']} | {point['stage']} "
            f"| {teacher['variant']} "
            f"| {value_text(teacher, metric)} | {value_text(point, metric)} | {change} "
            f"| {100 * compressed_fraction(point['params'], teacher['params']):.1f} % | {before} "
            f"| {teacher['updates']:,} | {point['updates']:,} |"
        )
    return "\n".join(lines) + "\n"


def compressed_fraction(student, teacher):
    """The student's tables whose size differs from the teacher's, over the same tables of the teacher."""
    changed = [table for table in ("input", "output") if student[table] != teacher[table]]
    return sum(student[table] for table in changed) / sum(teacher[table] for table in changed)


def by_kind(group):
    """(True, the dense runs), then (False, the rshare runs) of a group, each only where it has runs."""
    for dense in (True, False):
        kind = [point for point in group if point["variant"].startswith("dense") == dense]
        if kind:
            yield dense, kind


def best_at_budget(runs, params_of, metric):
    """The runs better than every run with no more parameters, by parameters; a tie in parameters
    keeps the better run."""
    sign = 1 if metric == "test_bleu" else -1  # BLEU: higher is better; perplexity: lower
    curve = []
    for run in sorted(runs, key=lambda r: (params_of(r), -sign * r[metric])):
        if not curve or sign * (run[metric] - curve[-1][metric]) > 0:
            curve.append(run)
    return curve


def plot(results, path, params_of, xlabel):
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    grouped = groups(points(results))
    figure, axes = plt.subplots(1, len(grouped), figsize=(5 * len(grouped), 4.4), squeeze=False)
    panels = []
    for axis, ((corpus, preset, trained), group) in zip(axes[0], grouped.items()):
        metric = metric_of(group[0])
        labels = []
        for dense, kind in by_kind(group):
            color, marker, label = ("black", "s", "dense") if dense else ("tab:blue", "o", "rshare")
            x = [params_of(point) for point in kind]
            y = [point[metric] for point in kind]
            spread = [[point[metric] - point["low"] for point in kind], [point["high"] - point[metric] for point in kind]]
            axis.errorbar(x, y, yerr=spread, fmt=marker, color=color, alpha=0.35, markersize=4, capsize=2)
            curve = best_at_budget(kind, params_of, metric)
            axis.errorbar([params_of(p) for p in curve], [p[metric] for p in curve],
                          yerr=[[p[metric] - p["low"] for p in curve], [p["high"] - p[metric] for p in curve]],
                          fmt=marker + "-", color=color, label=label, markersize=5, capsize=3)
            labels += [(params_of(point), point[metric], point["variant"], color) for point in curve]
        axis.set_xscale("log")
        axis.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        axis.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1e6:g}M" if x >= 1e6 else f"{x / 1e3:g}k"))
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.tick_params(axis="x", labelsize=7, labelrotation=30)
        axis.set_xlabel(xlabel)
        axis.set_ylabel(METRICS[metric] + (" (higher is better)" if metric == "test_bleu" else " (lower is better)"))
        precisions = [used for point in group for used in point["precisions"]]
        axis.set_title(f"{corpus} ({preset} preset, {schedule_text(trained, precisions)})")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
        panels.append((axis, labels))
    figure.tight_layout()
    for axis, labels in panels:  # once the layout is final: labels are placed in pixels
        place_labels(axis, labels)
    figure.savefig(path, dpi=110)
    plt.close(figure)


LABEL_PLACES = list(itertools.product((0, -1, 1, -2, 2, -3, 3), (1, -1)))  # (lines up, right or left)


def place_labels(axis, labels):
    """Writes each (x, y, text, color) label beside its point, in the place that stays inside the
    panel, overlaps neither the legend nor a label written before it, and crosses the fewest drawn
    curves, error bars and markers: tried right of the point, then left, then up or down in steps
    of a line (the first wins a tie). A label off its point's height gets a thin line to it; where
    no place is free, the label goes right of its point."""
    renderer = axis.figure.canvas.get_renderer()
    panel = axis.get_window_extent(renderer)
    written = [axis.get_legend().get_window_extent(renderer)] if axis.get_legend() else []
    for x, y, text, color in sorted(labels, key=lambda label: -label[1]):
        def write(lines, side, leader=False):
            label = axis.annotate(text, (x, y), textcoords="offset points", xytext=(5 * side, 8 * lines),
                                  ha="left" if side == 1 else "right", va="center", fontsize=7, color=color,
                                  arrowprops=dict(arrowstyle="-", color=color, linewidth=0.6,
                                                  shrinkA=0, shrinkB=3) if leader else None)
            return label, label.get_window_extent(renderer)

        best = None
        for lines, side in LABEL_PLACES:
            label, box = write(lines, side)
            label.remove()
            inside = panel.x0 <= box.x0 and box.x1 <= panel.x1 and panel.y0 <= box.y0 and box.y1 <= panel.y1
            if inside and not any(box.overlaps(other) for other in written):
                crossings = data_crossings(axis, box)
                if best is None or crossings < best[0]:
                    best = crossings, lines, side, box
                if crossings == 0:
                    break
        if best is None:
            written.append(write(0, 1)[1])
        else:
            _, lines, side, box = best
            write(lines, side, leader=lines != 0)
            written.append(box)  # the text's box, without its leader


def data_crossings(axis, box):
    """How many of the axis's drawn lines and error bars a label's display box crosses, and how many
    markers it covers (their centres, with a marker's radius around the box)."""
    crossings = 0
    for line in axis.lines:
        path = line.get_transform().transform_path(line.get_path())
        if line.get_linestyle() not in ("None", "", " "):
            crossings += path.intersects_bbox(box, filled=False)
        if line.get_marker() not in ("None", "", " ", None):
            marker_room = box.padded(line.get_markersize() / 2 * axis.figure.dpi / 72)
            crossings += sum(marker_room.contains(*vertex) for vertex in path.vertices)
    return crossings + sum(collection.get_transform().transform_path(path).intersects_bbox(box, filled=False)
                           for collection in axis.collections for path in collection.get_paths())


def curve_runs(results):
    """Per (corpus, preset, schedule): the runs whose validation curves a reader compares, those of
    the variants best at their budget (all parameters, dense and rshare apart) among the
    variants whose runs recorded a curve; every seed's run."""
    with_curves = [result for result in results if len(result.get("valid_curve", [])) > 1]
    chosen = {}
    for key, group in groups(points(with_curves)).items():
        metric = metric_of(group[0])
        best = {point["variant"] for _, kind in by_kind(group) for point in best_at_budget(kind, total_params, metric)}
        chosen[key] = sorted((run for run in with_curves if (run["corpus"], run["preset"], schedule(run)) == key
                              and run["variant"] in best), key=lambda run: (total_params(run), run["variant"]))
    return chosen


def curves_plot(chosen, path):
    """Validation perplexity against updates of the runs `curve_runs` chose, one panel per group:
    whether each run had converged when its schedule ended, pair by pair at the same update."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogFormatter

    figure, axes = plt.subplots(1, len(chosen), figsize=(5 * len(chosen), 4.4), squeeze=False)
    for axis, ((corpus, preset, trained), runs) in zip(axes[0], chosen.items()):
        variants = list(dict.fromkeys(run["variant"] for run in runs))
        labelled = set()
        for run in runs:
            variant = run["variant"]
            updates, perplexities = zip(*run["valid_curve"])
            axis.plot(updates, perplexities, "--" if variant.startswith("dense") else "-",
                      color=f"C{variants.index(variant) % 10}", linewidth=1.2,
                      label=None if variant in labelled else variant)  # one legend entry for all seeds
            labelled.add(variant)
        axis.set_yscale("log")
        for ticks in (axis.yaxis.set_major_formatter, axis.yaxis.set_minor_formatter):
            ticks(LogFormatter())  # plain numbers, not powers of ten
        axis.set_xlabel("updates")
        axis.set_ylabel("validation perplexity")
        trained = schedule_text(trained, map(precision, runs))
        axis.set_title(f"{corpus} ({preset} preset, {trained}): best at each budget", fontsize=10)
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="results JSON files or folders holding them")
    parser.add_argument("--markdown", default="results.md", help="markdown table to write")
    parser.add_argument("--compression-plot", default="compression.png",
                        help="PNG: the metric against embedding+softmax parameters")
    parser.add_argument("--budget-plot", default="budget.png", help="PNG: the metric against all parameters")
    parser.add_argument("--curves-plot", help="PNG: the validation curves of the runs best at each budget "
                        "(among those that recorded one)")
    args = parser.parse_args(argv)
    results = load(args.results)
    curves = curve_runs(results)
    if args.curves_plot and not curves:
        sys.exit("results_table: error: no run has a validation curve (results recorded before the "
                 "JSON kept one): leave out --curves-plot")
    table = markdown(results)
    with open(args.markdown, "w") as f:
        f.write(table)
    plot(results, args.compression_plot, lambda p: p["embedding_softmax_params"], "embedding + softmax parameters")
    plot(results, args.budget_plot, total_params, "all parameters")
    if args.curves_plot:
        curves_plot(curves, args.curves_plot)
    print(table)
    written = [args.markdown, args.compression_plot, args.budget_plot] + ([args.curves_plot] if args.curves_plot else [])
    print(f"wrote {', '.join(written[:-1])} and {written[-1]}")


if __name__ == "__main__":
    main()
