"""Hidden-state distillation (distill.intermediate): the terms, the default pairing of a depth
student, training with the online teacher, and TP=2 over gloo against one process."""

import json

import pytest
import torch
from helpers import compose, run_script, run_torchrun, train_losses
from test_distill import distill_args

from pipelines import stages
from pipelines.training import intermediate


def test_the_terms_against_their_definitions():
    torch.manual_seed(0)
    s, t = torch.randn(8, 2, 16, requires_grad=True), torch.randn(8, 2, 16)
    cosine = intermediate.pair_loss(s, t, "cosine")
    expected = (1 - (s * t).sum(-1) / (s.norm(dim=-1) * t.norm(dim=-1))).mean()
    torch.testing.assert_close(cosine, expected)
    torch.testing.assert_close(intermediate.pair_loss(s, t, "mse"), ((s - t) ** 2).mean())
    assert intermediate.pair_loss(t, t, "cosine").abs() < 1e-6
    pairs = [intermediate.Pair(0, 1, "cosine", 0.5), intermediate.Pair(1, 3, "mse", 2.0)]
    total = intermediate.hidden_loss(pairs, {0: s, 1: s}, {1: t, 3: t}, sequence_parallel_size=2)
    torch.testing.assert_close(total, (0.5 * cosine + 2.0 * ((s - t) ** 2).mean()) / 2)
    total.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_a_masked_term_counts_the_masked_tokens_as_the_logit_losses_do():
    """Conversations: only the counted tokens' states pull; over micro-batches with the global
    normalizer the terms add up to the mean over every counted token; sequence-parallel slices
    add up to the whole."""
    torch.manual_seed(0)
    pairs = [intermediate.Pair(0, 1, "cosine", 0.5), intermediate.Pair(0, 1, "mse", 2.0)]
    s, t = torch.randn(6, 2, 8, requires_grad=True), torch.randn(6, 2, 8)   # [s, b, h]
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 0, 0, 0, 1, 1]])            # [b, s]
    term = intermediate.hidden_loss(pairs, {0: s}, {1: t}, loss_mask=mask)
    counted = mask.t().bool()
    expected = sum(p.weight * intermediate.pair_loss(s[counted], t[counted], p.loss) for p in pairs)
    torch.testing.assert_close(term, expected)
    term.backward()
    assert s.grad[~counted].abs().sum() == 0 and s.grad[counted].abs().sum(-1).min() > 0
    # two micro-batches (one sequence each) with the global batch's share (trainer.share_tokens):
    # the schedule's mean over micro-batches is the mean over every counted token
    share = mask.sum() / 2
    halves = 0.5 * sum(intermediate.hidden_loss(pairs, {0: s[:, i:i + 1]}, {1: t[:, i:i + 1]},
                                          loss_mask=mask[i:i + 1], normalizer=share) for i in range(2))
    torch.testing.assert_close(halves, expected)
    # sequence parallel over 2: each rank holds 3 positions and its slice of the mask
    ranks = sum(intermediate.hidden_loss(pairs, {0: s[3 * r:3 * r + 3]}, {1: t[3 * r:3 * r + 3]},
                                         sequence_parallel_size=2, loss_mask=mask, sequence_parallel_rank=r)
                for r in range(2))
    torch.testing.assert_close(ranks, expected)


@pytest.fixture(scope="module")
def depth_student(tmp_path_factory, trained_teacher, tiny_data):
    """The trained teacher without its layers 1 and 2: student layers 0 and 1 came from 0 and 3."""
    folder = tmp_path_factory.mktemp("depth") / "prune_depth"
    stages.run("prune", compose("pipeline", ["experiment=demo", "prune=depth", f"prune.source={trained_teacher}",
                                             f"prune.output={folder}", f"data.output={tiny_data}",
                                             "prune.drop_layers=[1,2]", "model.vocab_size=300"]))
    return folder


def test_a_depth_students_layers_pair_with_the_layers_they_came_from(depth_student, trained_teacher):
    assert intermediate.source_layers(depth_student) == [0, 3]
    assert intermediate.source_layers(trained_teacher) is None
    d = compose("pipeline", ["experiment=demo", "distill.teacher=online",
                             "distill.intermediate=[{student:0,teacher:null},{student:1,teacher:null,loss:mse}]"]).distill
    arch = {"num_layers": 2, "hidden_size": 64}
    assert intermediate.pairs(d, "distill", depth_student, arch, {"num_layers": 4, "hidden_size": 64}) == [
        intermediate.Pair(0, 0, "cosine", 1.0), intermediate.Pair(1, 3, "mse", 1.0)]
    from pipelines.core.errors import UserError

    with pytest.raises(UserError, match="not pruned by depth"):
        intermediate.pairs(d, "distill", trained_teacher, arch, {"num_layers": 4, "hidden_size": 64})
    with pytest.raises(UserError, match="student width 64 != teacher width 48"):
        intermediate.pairs(d, "distill", depth_student, arch, {"num_layers": 4, "hidden_size": 48})


def online(teacher, **extra):
    return {"distill.teacher": "online", "distill.teacher_checkpoint": teacher, "distill.train_steps": 3,
            "distill.save_interval": 0, "distill.log_interval": 1, **extra}


PAIRS = "[{student:0,teacher:null},{student:1,teacher:null,loss:mse,weight:0.1}]"


def test_hidden_state_terms_train_with_the_online_teacher_and_match_at_tp2(tmp_path, depth_student, trained_teacher,
                                                                            tiny_data):
    plain = run_script("scripts/distill.py", *distill_args(depth_student, tiny_data, tmp_path / "plain",
                                                           **online(trained_teacher)), env={"OMP_NUM_THREADS": "1"})
    assert plain.returncode == 0, plain.stderr[-3000:]
    args = distill_args(depth_student, tiny_data, tmp_path / "one",
                        **online(trained_teacher, **{"distill.intermediate": PAIRS}))
    one = run_script("scripts/distill.py", *args, env={"OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr[-3000:]
    hidden, logits_only = train_losses(tmp_path / "one", "hidden"), train_losses(tmp_path / "plain")
    assert all(h > 0 for h in hidden)
    # the first step is the same model: the loss is the logits' loss plus the hidden-state term
    assert abs(train_losses(tmp_path / "one")[0] - (logits_only[0] + hidden[0])) < 1e-5
    assert "hidden" not in json.loads((tmp_path / "plain" / "train" / "metrics.jsonl").read_text().splitlines()[1])
    two = run_torchrun(2, "scripts/distill.py", *distill_args(depth_student, tiny_data, tmp_path / "two",
                                                              **online(trained_teacher, **{"distill.intermediate": PAIRS})),
                       "parallel.tensor=2")
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert all(abs(x - y) <= t for x, y, t in zip(a, b, [1e-5, 1e-5, 1e-3])), (a, b)
    assert all(abs(x - y) <= 1e-3 for x, y in zip(hidden, train_losses(tmp_path / "two", "hidden")))
