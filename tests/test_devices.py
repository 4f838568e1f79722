"""The output layer and training on every device torch sees here (the CPU, and a CUDA GPU where
there is one) and in every precision the device trains in: pool-scores against materialize and
the loss's gradients against autograd through a float64 dense layer; --fp16/--bf16 flags; the
four families training a few updates through fairseq-train, then exported."""
import argparse
import math
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import USER_DIR, fairseq
from fairseq_rshare import RandomSharedEmbedding, RandomSharedOutput, RShareConfigError
from fairseq_rshare.precision import check_precision
from fairseq_rshare.tools import training_speed

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# What each device trains in (fairseq's --fp16 needs a CUDA GPU).
PRECISIONS = {"cpu": ["float32", "bfloat16"], "cuda": ["float32", "float16", "bfloat16"]}
DEVICE_DTYPES = [(device, dtype) for device in DEVICES for dtype in PRECISIONS[device]]
# Largest error of a layer's log-probabilities against float64, over the reference's spread.
TOLERANCE = {"float32": 1e-5, "float16": 0.01, "bfloat16": 0.05}


def layer(kind, path, device, dtype, bias=True):
    torch.manual_seed(0)
    table = RandomSharedEmbedding(3001, 64, 1, 8, 400, pool_kind=kind)
    output = RandomSharedOutput(table, bias=bias, path=path)
    if bias:
        torch.nn.init.normal_(output.bias, std=0.1)
    return output.to(device=device, dtype=getattr(torch, dtype))


def dense_reference(output, features, targets):
    """float64 log-probabilities and the gradients of their summed NLL (features, pool, bias),
    by autograd through the materialised V x H matrix on the CPU."""
    pool = output.table.pool.detach().double().cpu().requires_grad_()
    bias = output.bias.detach().double().cpu().requires_grad_()
    features = features.detach().double().cpu().requires_grad_()
    mapping = output.table.mapping.cpu()
    weight = pool[mapping].flatten(1)
    log_probs = F.log_softmax(features @ weight.t() + bias, dim=-1)
    F.nll_loss(log_probs, targets.cpu(), reduction="sum").backward()
    return log_probs.detach(), (features.grad, pool.grad, bias.grad)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("kind", ["position", "global"])
def test_both_paths_give_the_float64_log_probs_on_the_device(device, dtype, kind):
    features = torch.randn(37, 64).to(device=device, dtype=getattr(torch, dtype))
    references = None
    for path in ("pool-scores", "materialize"):
        output = layer(kind, path, device, dtype).train()
        if references is None:
            references, _ = dense_reference(output, features, torch.zeros(37, dtype=torch.long))
        got = output(features)
        assert got.device.type == device and torch.isfinite(got).all()
        error = (got.double().cpu() - references).abs().max() / references.std()
        assert error < TOLERANCE[dtype], (path, float(error))


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_the_loss_gradients_equal_autograd_on_the_device(device, dtype):
    output = layer("position", "pool-scores", device, dtype)
    features = torch.randn(37, 64).to(device=device, dtype=getattr(torch, dtype)).requires_grad_()
    targets = torch.randint(3001, (37,), device=device)
    loss, nll = output.loss(features, targets)
    grads = torch.autograd.grad(loss, [features, output.table.pool, output.bias])
    references, reference_grads = dense_reference(output, features, targets)
    assert math.isclose(nll.item(), -float(references.gather(1, targets.cpu()[:, None]).sum()),
                        rel_tol=TOLERANCE[dtype])
    for got, expected in zip(grads, reference_grads):
        assert got.device.type == device
        error = (got.double().cpu() - expected).abs().max() / expected.abs().max()
        assert error < TOLERANCE[dtype], float(error)


def fairseq_common(**flags):
    """fairseq's config (cfg.common) as check_precision reads it."""
    common = dict(fp16=False, bf16=False, tpu=False, cpu=False, fp16_no_flatten_grads=False)
    common.update(flags)
    return argparse.Namespace(common=argparse.Namespace(**common))


def test_fp16_without_a_gpu_stops_with_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RShareConfigError, match="--fp16 trains on a CUDA GPU only"):
        check_precision(fairseq_common(fp16=True))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RShareConfigError, match="--fp16 trains on a CUDA GPU only"):
        check_precision(fairseq_common(fp16=True, cpu=True))
    check_precision(fairseq_common(fp16=True))


@pytest.mark.parametrize("gpu", [True, False])
def test_bf16_trains_on_the_gpu_or_the_cpu_not_a_missing_tpu(monkeypatch, gpu):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    cfg = fairseq_common(bf16=True, tpu=True)  # fairseq 0.12 sets --tpu for --bf16
    check_precision(cfg)
    assert not cfg.common.tpu
    assert cfg.common.cpu == cfg.common.fp16_no_flatten_grads == (not gpu)


@pytest.mark.parametrize("gpu, avx512_bf16, amx, warns", [
    (False, False, False, True), (False, True, False, False), (False, False, True, False), (True, False, False, False),
])
def test_bf16_warns_where_the_cpu_only_emulates_it(monkeypatch, caplog, gpu, avx512_bf16, amx, warns):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    check_precision(fairseq_common(bf16=True, tpu=True))
    check_precision(fairseq_common())  # float32 never warns
    emulated = [record for record in caplog.records if "bfloat16 is emulated" in record.getMessage()]
    assert len(emulated) == warns


LM_DATA_FLAGS = ["--task", "language_modeling", "--tokens-per-sample", "32"]
NMT_DATA_FLAGS = ["--task", "translation", "--source-lang", "de", "--target-lang", "en"]
SMALL = ["--decoder-embed-dim", "32", "--decoder-layers", "1"]
FAMILIES = {
    "lstm_lm": (LM_DATA_FLAGS, ["--arch", "rshare_lstm_lm", *SMALL, "--decoder-hidden-size", "32",
                                "--decoder-out-embed-dim", "32", "--rshare-output-bias"]),
    "transformer_lm": (LM_DATA_FLAGS, ["--arch", "rshare_transformer_lm", *SMALL, "--decoder-ffn-embed-dim", "64",
                                       "--decoder-attention-heads", "2", "--share-decoder-input-output-embed"]),
    "lstm": (NMT_DATA_FLAGS, ["--arch", "rshare_lstm", *SMALL, "--decoder-hidden-size", "32",
                              "--decoder-out-embed-dim", "32", "--encoder-embed-dim", "32",
                              "--encoder-hidden-size", "32", "--share-all-embeddings"]),
    "transformer": (NMT_DATA_FLAGS, ["--arch", "rshare_transformer", *SMALL, "--decoder-ffn-embed-dim", "64",
                                     "--decoder-attention-heads", "2", "--encoder-layers", "1",
                                     "--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
                                     "--encoder-attention-heads", "2", "--rshare-subvectors", "4"]),
}
PRECISION_FLAGS = {"float32": [], "float16": ["--fp16"], "bfloat16": ["--bf16"]}


def device_flags(device):
    return ["--cpu"] if device == "cpu" else []


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_trains_on_the_device_and_exports(family, device, lm_data, nmt_data, tmp_path):
    task, model = FAMILIES[family]
    data = lm_data if task is LM_DATA_FLAGS else nmt_data
    result = fairseq("fairseq-train", data, "--user-dir", USER_DIR, *device_flags(device), *task, *model,
                     "--optimizer", "adam", "--lr", "0.005", "--max-tokens", "1024", "--max-update", "5",
                     "--seed", "1", "--no-epoch-checkpoints", "--disable-validation", "--log-format", "simple",
                     "--no-progress-bar", "--save-dir", tmp_path, "--criterion", "rshare_cross_entropy")
    assert training_speed(result.stdout + result.stderr)[0] == 5
    exported = subprocess.run([sys.executable, "-m", "fairseq_rshare.cli.export", tmp_path / "checkpoint_last.pt",
                               tmp_path / "exported.pt"], capture_output=True, text=True)
    assert exported.returncode == 0, exported.stderr
    assert f"a stock {family} checkpoint" in exported.stdout


def lstm_lm_losses(data, device, dtype, updates=20):
    """The train_inner losses of the small LSTM LM, every 5 updates, trained in `dtype` on `device`."""
    task, model = FAMILIES["lstm_lm"]
    result = fairseq("fairseq-train", data, "--user-dir", USER_DIR, *device_flags(device), *task, *model,
                     *PRECISION_FLAGS[dtype], "--optimizer", "adam", "--lr", "0.005", "--max-tokens", "1024",
                     "--max-update", updates, "--seed", "1", "--no-save", "--disable-validation", "--log-format",
                     "simple", "--log-interval", "5", "--no-progress-bar", "--criterion", "rshare_cross_entropy")
    return [float(loss) for loss in re.findall(r"train_inner \| .*? loss=([^,]+),", result.stdout + result.stderr)]


@pytest.mark.slow
@pytest.mark.parametrize("device,dtype", [(device, dtype) for device, dtype in DEVICE_DTYPES if dtype != "float32"])
def test_the_lstm_lm_trains_in_lower_precision_close_to_float32(device, dtype, lm_data):
    """The same 20 updates in float32 and in a lower precision: every loss finite, the last
    within 5 % of float32's."""
    losses, reference = lstm_lm_losses(lm_data, device, dtype), lstm_lm_losses(lm_data, device, "float32")
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses), losses
    assert abs(losses[-1] - reference[-1]) < 0.05 * reference[-1], (losses, reference)


def lstm_lm_checkpoint(data, device, dtype, save_dir, updates):
    """checkpoint_last.pt of the small LSTM LM trained (or resumed) to `updates` in `dtype`."""
    task, model = FAMILIES["lstm_lm"]
    fairseq("fairseq-train", data, "--user-dir", USER_DIR, *device_flags(device), *task, *model,
            *PRECISION_FLAGS[dtype], "--optimizer", "adam", "--lr", "0.005", "--max-tokens", "1024",
            "--max-update", updates, "--seed", "1", "--no-epoch-checkpoints", "--disable-validation",
            "--no-progress-bar", "--criterion", "rshare_cross_entropy", "--save-dir", save_dir)
    return torch.load(save_dir / "checkpoint_last.pt", map_location="cpu", weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("device,dtype", [(device, dtype) for device, dtype in DEVICE_DTYPES if dtype != "float32"])
def test_a_lower_precision_run_resumes_from_its_fp32_master_weights(device, dtype, lm_data, tmp_path):
    """20 updates at once, and 10 then 10 more after a resume, end with the same weights bit for
    bit: the checkpoint carries the fp32 master copy, not only its 16-bit rounding."""
    whole = lstm_lm_checkpoint(lm_data, device, dtype, tmp_path / "whole", 20)
    lstm_lm_checkpoint(lm_data, device, dtype, tmp_path / "resumed", 10)
    resumed = lstm_lm_checkpoint(lm_data, device, dtype, tmp_path / "resumed", 20)
    assert resumed["optimizer_history"][-1]["num_updates"] == 20
    for name, weights in whole["model"].items():
        assert torch.equal(weights, resumed["model"][name]), name
    master = whole["last_optimizer_state"]["fp32_params"]
    assert [weights.dtype for weights in master] == [torch.float32] * len(master)
    for weights, resumed_weights in zip(master, resumed["last_optimizer_state"]["fp32_params"], strict=True):
        assert torch.equal(weights, resumed_weights)
