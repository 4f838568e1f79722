"""The rshare_distill criterion: its loss against independent computations, a frozen teacher that
is never trained nor saved, real fairseq-train runs distilling an LM and a translation model."""
import hashlib
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, kl_divergence

import fairseq_rshare  # noqa: F401
from fairseq import checkpoint_utils, options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.trainer import Trainer
from fairseq_rshare.checkpoints import FAIRSEQ_GLOBALS
from fairseq_rshare.criterions.rshare_cross_entropy import RShareCrossEntropyCriterion
from fairseq_rshare.criterions.rshare_distill import RShareDistillCriterion
from fairseq_rshare.errors import RShareConfigError

from conftest import USER_DIR, fairseq

# One worker trains the module's shared models (xdist_group) once.
pytestmark = pytest.mark.xdist_group("distill")

SMALL_LSTM_LM = ["--arch", "rshare_lstm_lm", "--decoder-embed-dim", "32", "--decoder-hidden-size", "32",
                 "--decoder-out-embed-dim", "32", "--decoder-layers", "1"]
STATEFUL = ["--user-dir", USER_DIR, "--cpu", "--task", "stateful_lm", "--tokens-per-sample", "10",
            "--batch-size", "4", "--batch-size-valid", "4", "--optimizer", "adam", "--lr", "0.01",
            "--seed", "1", "--no-progress-bar", "--log-format", "simple", "--no-epoch-checkpoints"]
TINY_TRANSFORMER = ["--arch", "rshare_transformer", "--encoder-layers", "1", "--decoder-layers", "1",
                    "--encoder-embed-dim", "32", "--decoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
                    "--decoder-ffn-embed-dim", "64", "--encoder-attention-heads", "2",
                    "--decoder-attention-heads", "2"]


def train(data, save_dir, *flags):
    return fairseq("fairseq-train", data, *flags, "--save-dir", save_dir)


@pytest.fixture(scope="module")
def teachers(lm_data, tmp_path_factory):
    """Checkpoint of a small teacher of each kind ("dense", "rshare"), trained on the PTB slice
    a few updates under stateful_lm when first asked for."""
    paths = {}

    def teacher(kind="dense"):
        if kind not in paths:
            save_dir = tmp_path_factory.mktemp(f"teacher-{kind}")
            tables = ["--rshare-tables", "none"] if kind == "dense" else ["--rshare-output-path", "materialize"]
            train(lm_data, save_dir, *STATEFUL, *SMALL_LSTM_LM, *tables, "--max-update", "10",
                  "--disable-validation")
            paths[kind] = save_dir / "checkpoint_last.pt"
        return paths[kind]
    return teacher


def parse(data, *flags):
    parser = options.get_training_parser()
    return options.parse_args_and_arch(parser, [str(data), *STATEFUL, *map(str, flags)])


def stateful_student(data, *flags):
    """(task, model, first training window) of a small rshare LSTM student on `data`."""
    args = parse(data, *SMALL_LSTM_LM, "--dropout", "0", *flags)
    task = tasks.setup_task(args)
    task.load_dataset("train")
    dataset = task.dataset("train")
    return task, task.build_model(args), dataset.collate([dataset[0]])


def distill(task, teacher_path, weight=0.5, temperature=1.0, label_smoothing=0.0):
    return RShareDistillCriterion(task, sentence_avg=False, label_smoothing=label_smoothing,
                                  teacher_path=str(teacher_path), distill_weight=weight,
                                  distill_temperature=temperature)


@pytest.mark.parametrize("path,label_smoothing", [("pool-scores", 0.0), ("materialize", 0.1)])
def test_weight_zero_and_validation_give_rshare_cross_entropy_exactly(path, label_smoothing, lm_data, teachers):
    task, model, sample = stateful_student(lm_data, "--rshare-output-path", path)
    plain = RShareCrossEntropyCriterion(task, sentence_avg=False, label_smoothing=label_smoothing)
    for mode, weight in (("train", 0.0), ("eval", 0.7)):
        getattr(model, mode)()
        criterion = distill(task, teachers(), weight=weight, temperature=2.0, label_smoothing=label_smoothing)
        expected = plain(model, sample)  # the window starts the streams: no state is carried in
        got = criterion(model, sample)
        assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]
        assert criterion.teacher.decoder.carried_state == {}  # the teacher never ran


class FixedLogits(torch.nn.Module):
    """A student whose output is one float64 tensor of logits (sentences x tokens x V)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, src_tokens, **unused):
        return self.logits, None

    def get_normalized_probs(self, net_output, log_probs, sample=None):
        return F.log_softmax(net_output[0], dim=-1)

    def get_targets(self, sample, net_output):
        return sample["target"]


@pytest.mark.parametrize("weight,temperature", [(1.0, 2.0), (0.3, 1.0), (0.6, 0.5)])
def test_loss_and_gradient_match_an_independent_float64_computation(weight, temperature, lm_data, teachers):
    task, _, sample = stateful_student(lm_data)
    pad = task.dictionary.pad()
    sample["target"][0, -3:] = pad  # padded targets are not scored
    sample["ntokens"] = int(sample["target"].ne(pad).sum())
    torch.manual_seed(0)
    student = FixedLogits(3 * torch.randn(*sample["target"].shape, len(task.dictionary), dtype=torch.float64))
    criterion = distill(task, teachers(), weight=weight, temperature=temperature)
    loss, sample_size, logged = criterion(student, sample)
    loss.backward()

    with torch.serialization.safe_globals(FAIRSEQ_GLOBALS):
        [teacher], _ = checkpoint_utils.load_model_ensemble([str(teachers())])
    with torch.no_grad():
        teacher_logits, _ = teacher.eval()(**sample["net_input"])
    scored = sample["target"].ne(pad)
    logits = student.logits.detach().requires_grad_()
    kl = kl_divergence(Categorical(logits=teacher_logits[scored].double() / temperature),
                       Categorical(logits=logits[scored] / temperature)).sum()
    nll = -Categorical(logits=logits[scored]).log_prob(sample["target"][scored]).sum()
    expected = (1 - weight) * nll + weight * temperature**2 * kl
    [expected_grad] = torch.autograd.grad(expected, logits)

    assert sample_size == sample["ntokens"] == int(scored.sum())
    # The teacher's log-probabilities come in float32: agreement to about 1e-8, not 1e-15.
    assert loss.item() == pytest.approx(expected.item(), rel=1e-7)
    assert logged["distill_kl"].item() == pytest.approx(kl.item(), rel=1e-7) and kl.item() > 0.1
    assert logged["nll_loss"].item() == pytest.approx(nll.item(), rel=1e-7)
    assert torch.allclose(student.logits.grad, expected_grad, rtol=0, atol=1e-7)
    assert student.logits.grad[0, -3:].abs().max() == 0


def test_teacher_stays_frozen_through_fairseq_training_steps(lm_data, teachers):
    """fairseq's own Trainer, as fairseq-train drives it: the teacher is not among the optimised
    weights, stays in eval mode, and its weights are those of its file after the updates."""
    args = parse(lm_data, *SMALL_LSTM_LM, "--criterion", "rshare_distill", "--teacher-path", teachers(),
                 "--distill-temperature", "2", "--rshare-output-path", "materialize")
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    task.load_dataset("train")
    model, criterion = task.build_model(cfg.model), task.build_criterion(cfg.criterion)
    trainer = Trainer(cfg, task, model, criterion)
    batches = task.get_batch_iterator(task.dataset("train")).next_epoch_itr(shuffle=False)
    kls = [trainer.train_step([next(batches)])["distill_kl"] for _ in range(4)]

    assert all(kl > 0 for kl in kls)
    assert list(criterion.parameters()) == [] and not criterion.teacher.training
    optimised = {id(p) for group in trainer.optimizer.optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in model.parameters()}
    with torch.serialization.safe_globals(FAIRSEQ_GLOBALS):
        saved = checkpoint_utils.load_checkpoint_to_cpu(str(teachers()))["model"]
    for name, value in criterion.teacher.state_dict().items():
        assert torch.equal(value, saved[name]), name
    assert set(criterion.teacher.decoder.carried_state) == {"eval"}  # it carried its own state


def test_bad_settings_fail_when_the_criterion_is_built(lm_data, teachers, tmp_path):
    task, _, _ = stateful_student(lm_data)
    with pytest.raises(RShareConfigError, match="rshare_distill needs --teacher-path"):
        distill(task, "")
    with pytest.raises(RShareConfigError, match="--teacher-path .*missing.pt: no such file"):
        distill(task, tmp_path / "missing.pt")
    for weight in (-0.1, 1.5):
        with pytest.raises(RShareConfigError, match=rf"--distill-weight {weight}: give a number in \[0, 1\]"):
            distill(task, teachers(), weight=weight)
    with pytest.raises(RShareConfigError, match="--distill-temperature 0.0: give a number > 0"):
        distill(task, teachers(), temperature=0.0)


def with_a_smaller_dictionary(lm_data, folder):
    """`lm_data` with its dictionary cut to its first 100 words."""
    shutil.copytree(lm_data, folder)
    lines = (folder / "dict.txt").read_text().splitlines()[:100]
    (folder / "dict.txt").write_text("\n".join(lines) + "\n")
    return folder


@pytest.mark.parametrize("kind", ["dense", pytest.param("rshare", marks=pytest.mark.slow)])
def test_a_teacher_of_another_dictionary_fails_clearly(kind, lm_data, teachers, tmp_path):
    task, _, _ = stateful_student(with_a_smaller_dictionary(lm_data, tmp_path / "small"))
    words = len(task.dictionary)
    with pytest.raises(RShareConfigError,
                       match=rf"trained with another dictionary than the student's {words} words"):
        distill(task, teachers(kind))


@pytest.mark.slow
def test_a_stock_fairseq_teacher_distils_but_cannot_carry_state(lm_data, tmp_path):
    lm = ["--cpu", "--task", "language_modeling", "--tokens-per-sample", "16", "--decoder-embed-dim", "32",
          "--decoder-hidden-size", "32", "--decoder-out-embed-dim", "32"]
    train(lm_data, tmp_path, *lm, "--arch", "lstm_lm", "--max-tokens", "256", "--optimizer", "adam",
          "--max-update", "2", "--disable-validation", "--no-progress-bar")
    teacher = tmp_path / "checkpoint_last.pt"
    args = options.parse_args_and_arch(options.get_training_parser(),
                                       [str(lm_data), "--user-dir", USER_DIR, *lm, "--arch", "rshare_lstm_lm"])
    task = tasks.setup_task(args)
    task.load_dataset("train")
    dataset = task.dataset("train")
    sample = dataset.collater([dataset[0], dataset[1]])
    _, _, logged = distill(task, teacher)(task.build_model(args).train(), sample)
    assert logged["distill_kl"] > 0
    stateful_task, _, _ = stateful_student(lm_data)
    with pytest.raises(RShareConfigError, match="carries the LSTM state between batches, which this teacher cannot"):
        distill(stateful_task, teacher)


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_holds_no_teacher_tensor(checkpoint, teacher_path):
    """No criterion state in the student's checkpoint, no teacher weight among its tensors, and
    optimizer state for the student's own parameters only."""
    with torch.serialization.safe_globals(FAIRSEQ_GLOBALS):
        state = checkpoint_utils.load_checkpoint_to_cpu(str(checkpoint))
        teacher = checkpoint_utils.load_checkpoint_to_cpu(str(teacher_path))["model"]
    assert state["criterion"] is None
    assert state["optimizer_history"][-1]["criterion_name"] == "RShareDistillCriterion"
    weights = [t for t in teacher.values() if t.is_floating_point() and t.numel() > 1]
    for name, value in state["model"].items():
        assert not any(value.shape == t.shape and torch.equal(value, t) for t in weights), name
    with torch.serialization.safe_globals(FAIRSEQ_GLOBALS):
        [student], _ = checkpoint_utils.load_model_ensemble([str(checkpoint)])
    optimised = sum(p["exp_avg"].numel() for p in state["last_optimizer_state"]["state"].values())
    assert optimised == sum(p.numel() for p in student.parameters())


@pytest.mark.slow
def test_stateful_lm_run_distils_and_saves_no_teacher(lm_data, teachers, tmp_path):
    teacher = teachers()
    before = sha256(teacher)
    result = train(lm_data, tmp_path, *STATEFUL, *SMALL_LSTM_LM, "--rshare-output-path", "materialize",
                   "--criterion", "rshare_distill", "--teacher-path", teacher, "--distill-weight", "0.5",
                   "--distill-temperature", "2", "--max-update", "12", "--log-interval", "4")
    log = result.stdout + result.stderr
    kls = [float(x) for x in re.findall(r"\| train_inner \|.*? distill_kl=([\d.]+)", log)]
    assert len(kls) == 3 and all(kl > 0 for kl in kls)
    valid = re.search(r"\| valid \|.*? loss ([\d.]+) \| nll_loss ([\d.]+) \|", log)
    assert valid and valid.group(1) == valid.group(2)  # validation: the plain cross-entropy
    assert "distill_kl" not in re.search(r"\| valid \|.*", log).group(0)
    assert sha256(teacher) == before
    assert_holds_no_teacher_tensor(tmp_path / "checkpoint_last.pt", teacher)


@pytest.mark.slow
def test_bad_flag_is_one_line_from_fairseq_train(lm_data, teachers, tmp_path):
    result = fairseq("fairseq-train", lm_data, *STATEFUL, *SMALL_LSTM_LM, "--criterion", "rshare_distill",
                     "--teacher-path", teachers(), "--distill-temperature", "-1", "--save-dir", tmp_path,
                     check=False)
    assert result.returncode != 0
    assert "fairseq_rshare: error: --distill-temperature -1.0: give a number > 0" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_translation_run_distils_from_a_dense_teacher(nmt_data, tmp_path):
    common = ["--user-dir", USER_DIR, "--cpu", "--task", "translation", "--source-lang", "de",
              "--target-lang", "en", "--optimizer", "adam", "--lr", "0.005", "--max-tokens", "1024",
              "--seed", "1", "--no-progress-bar", "--log-format", "simple", "--no-epoch-checkpoints",
              "--log-interval", "2", "--max-update", "6", *TINY_TRANSFORMER]
    train(nmt_data, tmp_path / "teacher", *common, "--rshare-tables", "none", "--disable-validation")
    teacher = tmp_path / "teacher" / "checkpoint_last.pt"
    result = train(nmt_data, tmp_path / "student", *common, "--rshare-subvectors", "4",
                   "--criterion", "rshare_distill", "--teacher-path", teacher, "--label-smoothing", "0.1",
                   "--distill-temperature", "2")
    log = result.stdout + result.stderr
    kls = [float(x) for x in re.findall(r"\| train_inner \|.*? distill_kl=([\d.]+)", log)]
    assert len(kls) == 3 and all(kl > 0 for kl in kls)
    assert re.search(r"\| valid \|.*? nll_loss [\d.]+", log)
    assert_holds_no_teacher_tensor(tmp_path / "student" / "checkpoint_last.pt", teacher)
