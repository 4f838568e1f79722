"""README's Usage section, its bash blocks taken from README.md as they stand, run on a slice of
PTB with a short schedule: train, evaluate, export, and evaluate the export with stock fairseq."""
import os
import re
import subprocess

import pytest

from conftest import REPO, head, shared_corpus
from fairseq_rshare.tools import environment_with_tools

pytestmark = pytest.mark.slow

FETCH = "python3 recipes/fetch_data.py ptb data/ptb"
SCHEDULE = "--max-epoch 13"


def usage_script():
    """The bash blocks of README's Usage section, in order, as one script."""
    with open(os.path.join(REPO, "README.md")) as f:
        usage = re.search(r"\n## Usage\n(.*?)\n## ", f.read(), re.S).group(1)
    return "".join(re.findall(r"```bash\n(.*?)```", usage, re.S))


def on_a_slice(script, ptb):
    """The script on the PTB text in `ptb` (no download into data/ptb) for 30 updates."""
    assert script.count(FETCH) == 1 and script.count(SCHEDULE) == 1
    script = re.sub(re.escape(FETCH) + r".*\n", "", script)
    return script.replace("data/ptb/", f"{ptb}/").replace(SCHEDULE, "--max-epoch 1 --max-update 30")


def test_readme_usage_runs_and_stock_fairseq_evaluates_the_export_as_the_plugin(tmp_path):
    ptb = tmp_path / "ptb"
    ptb.mkdir()
    for split, lines in (("train", 2000), ("valid", 200), ("test", 200)):
        head(os.path.join(shared_corpus("ptb"), f"{split}.txt"), ptb / f"{split}.txt", lines)
    script = usage_script()
    assert "fairseq-rshare-export checkpoints/ptb/checkpoint_best.pt" in script
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", on_a_slice(script, ptb)], cwd=tmp_path,
                            capture_output=True, text=True, env=environment_with_tools())
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    assert "a stock lstm_lm checkpoint" in log
    # Two evaluations, the plugin's stateful one of the checkpoint, then stock fairseq's of the
    # export: every test token (each line's words and its end of line), the same perplexity.
    stateful, stock = re.findall(r"Evaluated ([\d,]+) tokens.*\n.*Perplexity: ([\d.]+)", log)
    with open(ptb / "test.txt") as f:
        tokens = sum(len(line.split()) + 1 for line in f)
    assert int(stateful[0].replace(",", "")) == int(stock[0].replace(",", "")) == tokens
    assert float(stock[1]) == pytest.approx(float(stateful[1]), rel=1e-4)
