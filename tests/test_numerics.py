"""Property and precision checks of the random-shared layers."""
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fairseq_rshare import RandomSharedEmbedding, RandomSharedOutput
from fairseq_rshare.mapping import fingerprint, make_mapping


@st.composite
def valid_tables(draw):
    K = draw(st.integers(1, 6))
    H = K * draw(st.integers(1, 5))
    V = draw(st.integers(2, 300))
    kind = draw(st.sampled_from(["position", "global"]))
    if kind == "position":
        M = K * draw(st.integers(2, max(2, V - 1)))
    else:
        M = draw(st.integers(K, V * K - 1))
    most_private = max(0, min(V - 1, M // K - 2))
    private_words = draw(st.lists(st.integers(0, V - 1), unique=True, max_size=most_private))
    return V, H, K, M, kind, private_words, draw(st.booleans()), draw(st.integers(0, 2**32))


@settings(max_examples=80, deadline=None)
@given(valid_tables(), st.integers(1, 7))
def test_fast_logits_equal_materialized_logits_for_any_valid_table(table, tokens):
    V, H, K, M, kind, private_words, bias, seed = table
    if kind == "position" and M >= V * K:
        return
    output = RandomSharedOutput(
        RandomSharedEmbedding(V, H, 0, K, M, kind, seed, private_words), bias=bias, path="pool-scores"
    ).double()
    if bias:
        torch.nn.init.normal_(output.bias)
    features = torch.randn(tokens, H, dtype=torch.float64)
    assert torch.allclose(output(features), output.materialized_forward(features), atol=1e-9)


@pytest.mark.parametrize("path", ["pool-scores", "materialize"])
def test_bf16_autocast_logits_stay_close_to_fp32(path):
    torch.manual_seed(0)
    output = RandomSharedOutput(RandomSharedEmbedding(5000, 256, 1, 8, 4000), bias=True, path=path)
    torch.nn.init.normal_(output.bias, std=0.1)
    features = torch.randn(64, 256)
    reference = output(features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low_precision = output(features)
    error = (low_precision.float() - reference).abs().max() / reference.std()
    assert error < 0.05  # the pool scores are bf16, their sums fp32


MAPPING_SCRIPT = """
import sys, torch, numpy
from fairseq_rshare.mapping import fingerprint, make_mapping
torch.set_num_threads(int(sys.argv[1]))
print(fingerprint(make_mapping(20000, 8, 16000, sys.argv[2], seed=42)))
"""


def test_mapping_is_the_same_in_another_process_with_other_thread_settings():
    for kind in ("position", "global"):
        here = fingerprint(make_mapping(20000, 8, 16000, kind, seed=42))
        for threads in ("1", "2"):
            there = subprocess.run(
                [sys.executable, "-c", MAPPING_SCRIPT, threads, kind],
                capture_output=True, text=True, check=True,
                env={**os.environ, "OMP_NUM_THREADS": threads, "PYTHONHASHSEED": threads},
            ).stdout.split()[-1]
            assert there == here
