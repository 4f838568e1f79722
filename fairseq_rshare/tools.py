"""Run fairseq's command-line tools with the fairseq of the running Python, whatever PATH says.

A virtualenv need not be activated: its console scripts sit beside its Python
(``sys.executable``), so that is where they are looked for.  Where they are not (an install
without console scripts), the tool runs as a module, ``python -m fairseq_cli.<tool>``; the
script is preferred because ``-m`` would also import a ``fairseq`` folder from the working
directory (a fairseq checkout) instead of the installed one.
"""
import os
import sys


def fairseq_tool(name):
    """The command (a list) that runs fairseq tool ``name``, e.g. ``"fairseq-train"``
    (``python -m fairseq_cli.train`` where no script sits beside the Python)."""
    script = os.path.join(os.path.dirname(sys.executable), name)
    if os.path.isfile(script):
        return [script]
    return [sys.executable, "-m", "fairseq_cli." + name[len("fairseq-"):].replace("-", "_")]
