"""Every benchmark in one command: layers, whole training, the compression stages, then the plots.

    python benchmarks/run_all.py            # ~75 minutes on 2 cores
    python benchmarks/run_all.py --smoke    # tiny sizes, a few minutes (what CI runs)

Writes benchmarks/results/{layers,training}.{json,md,png} and stages.{json,md} (or under --out).
"""
import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the benchmarks run")
    parser.add_argument("--out", default=os.path.join(HERE, "results"), help="results folder")
    args = parser.parse_args()
    extra = ["--smoke"] if args.smoke else []
    for script in ("bench_layers.py", "bench_training.py", "bench_stages.py"):
        print(f"==> {script} {' '.join(extra)}", flush=True)
        subprocess.run([sys.executable, os.path.join(HERE, script), *extra, "--out", args.out], check=True)
    subprocess.run([sys.executable, os.path.join(HERE, "plot.py"), "--results", args.out], check=True)


if __name__ == "__main__":
    main()
