"""Losses: hand-computed small cases, and the cross-device acceptance test (2 gloo processes on CPU
must match one process on the concatenated batch)."""
import math
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from reprolib.losses import (
    FALSE_NEGATIVE_FILL,
    contrastive_loss,
    false_negative_mask,
    flops_regularizer,
    gather_with_grad,
    kl_distillation,
    margin_mse,
)


def _ce(row, target):
    """-log softmax(row)[target], by hand."""
    return -row[target] + math.log(sum(math.exp(v) for v in row))


# ---------------------------------------------------------------- contrastive loss, one process


def test_contrastive_loss_hand_computed_with_in_batch_negatives():
    # B=2 queries, G=2 passages each: [p0+, n0, p1+, n1]; targets 0 and 2.
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 3.0], [1.0, 1.0]])
    rows = [[2.0, 0.0, 1.0, 1.0], [0.0, 1.0, 3.0, 1.0]]  # q @ p.T
    expected = (_ce(rows[0], 0) + _ce(rows[1], 2)) / 2
    assert contrastive_loss(q, p, group_size=2).item() == pytest.approx(expected, rel=1e-6)
    # temperature divides the scores
    tau = 0.5
    expected_tau = (_ce([v / tau for v in rows[0]], 0) + _ce([v / tau for v in rows[1]], 2)) / 2
    assert contrastive_loss(q, p, group_size=2, temperature=tau).item() == pytest.approx(expected_tau, rel=1e-6)


def test_contrastive_loss_targets_are_i_times_g():
    torch.manual_seed(0)
    B, G, d = 3, 4, 5
    q, p = torch.randn(B, d), torch.randn(B * G, d)
    expected = F.cross_entropy(q @ p.T, torch.tensor([0, 4, 8]))
    torch.testing.assert_close(contrastive_loss(q, p, G), expected)
    # a strongly aligned positive at i*G drives the loss to ~0
    p_aligned = p.clone()
    p_aligned[torch.arange(B) * G] = 100 * q
    assert contrastive_loss(q, p_aligned, G).item() < 1e-6


def test_the_world_size_scales_the_gradient_not_the_value():
    from reprolib.losses import _scale_gradient

    x = torch.tensor([0.3, -1.7], requires_grad=True)
    scaled = _scale_gradient((x ** 2).sum(), 4)
    assert scaled.item() == (x ** 2).sum().item()
    scaled.backward()
    torch.testing.assert_close(x.grad, 4 * 2 * x.detach())


def test_contrastive_loss_without_process_group_ignores_cross_device_and_scaling():
    torch.manual_seed(1)
    q, p = torch.randn(2, 3), torch.randn(6, 3)
    base = contrastive_loss(q, p, 3)
    torch.testing.assert_close(contrastive_loss(q, p, 3, cross_device=True, scale_by_world_size=True), base)
    assert gather_with_grad(q) is q


def test_contrastive_loss_rejects_wrong_passage_count():
    with pytest.raises(ValueError, match="B\\*G"):
        contrastive_loss(torch.zeros(2, 3), torch.zeros(5, 3), 3)


def test_false_negative_masking():
    # query 1's positive (id 7) also appears as query 0's hard negative, and vice versa (id 3)
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 3.0], [1.0, 1.0]])
    ids = torch.tensor([3, 7, 7, 3])
    mask = false_negative_mask(ids, torch.tensor([0, 2]))
    assert mask.tolist() == [[False, False, False, True], [False, True, False, False]]
    rows = [[2.0, 0.0, 1.0, FALSE_NEGATIVE_FILL], [0.0, FALSE_NEGATIVE_FILL, 3.0, 1.0]]
    expected = (_ce(rows[0], 0) + _ce(rows[1], 2)) / 2
    assert contrastive_loss(q, p, 2, passage_ids=ids).item() == pytest.approx(expected, rel=1e-6)
    # all labelled positives per query (padded with -1): query 0 also has id 7 as a positive
    positives = torch.tensor([[3, 7], [7, -1]])
    mask = false_negative_mask(ids, torch.tensor([0, 2]), positives)
    assert mask.tolist() == [[False, True, True, True], [False, True, False, False]]


# ---------------------------------------------------------------- distillation, FLOPS


def test_kl_distillation_hand_computed_and_reductions():
    s = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    t = torch.tensor([[3.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    B, G = s.shape
    total = 0.0
    for srow, trow in zip(s.tolist(), t.tolist()):
        zt = sum(math.exp(v) for v in trow)
        zs = sum(math.exp(v) for v in srow)
        for sv, tv in zip(srow, trow):
            pt = math.exp(tv) / zt
            total += pt * (math.log(pt) - (sv - math.log(zs)))  # KL(teacher || student)
    assert kl_distillation(s, t, reduction="batchmean").item() == pytest.approx(total / B, rel=1e-5)
    assert kl_distillation(s, t).item() == pytest.approx(total / (B * G), rel=1e-5)
    # "mean" (RetroMAE) is "batchmean" (LexMAE) divided by G
    ratio = kl_distillation(s, t, reduction="batchmean") / kl_distillation(s, t, reduction="mean")
    assert ratio.item() == pytest.approx(G, rel=1e-6)
    # the temperature divides the student scores only
    torch.testing.assert_close(kl_distillation(s, t, temperature=2.0), kl_distillation(s / 2, t))
    assert kl_distillation(t, t).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError):
        kl_distillation(s, t, reduction="none")


def test_kl_distillation_gradient_reaches_student_only():
    s = torch.randn(2, 4, requires_grad=True)
    t = torch.randn(2, 4, requires_grad=True)
    kl_distillation(s, t).backward()
    assert s.grad is not None and t.grad is None


def test_margin_mse_hand_computed():
    sp = torch.tensor([3.0, 1.0])
    sn = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    tp = torch.tensor([5.0, 2.0])
    tn = torch.tensor([[4.0, 5.0], [0.0, 3.0]])
    # student margins [[2, 1], [1, 0]], teacher margins [[1, 0], [2, -1]] -> squared errors 1, 1, 1, 1
    assert margin_mse(sp, sn, tp, tn).item() == pytest.approx(1.0)
    # one negative per query, all [B]
    assert margin_mse(sp, sn[:, 0], tp, tn[:, 0]).item() == pytest.approx((1 + 1) / 2)
    assert margin_mse(sp.unsqueeze(1), sn, tp.unsqueeze(1), tn).item() == pytest.approx(1.0)


def test_flops_regularizer_hand_computed():
    x = torch.tensor([[1.0, 0.0, -2.0], [3.0, 0.0, 0.0]])
    # column means of |x|: 2, 0, 1 -> 4 + 0 + 1
    assert flops_regularizer(x).item() == pytest.approx(5.0)
    assert flops_regularizer(torch.zeros(4, 10)).item() == 0.0


# ---------------------------------------------------------------- cross-device acceptance test

N, G, D_IN, D = 3, 4, 6, 5  # per-process queries, group size, input and embedding dims
WORLD_SIZE = 2
CONFIGS = {  # name -> contrastive_loss keyword arguments
    "scaled": dict(cross_device=True, scale_by_world_size=True),
    "unscaled": dict(cross_device=True, scale_by_world_size=False),
    "scaled_tau_masked": dict(cross_device=True, scale_by_world_size=True, temperature=0.5, masked=True),
    "docs_only": dict(cross_device=True, scale_by_world_size=False, gather_queries=False),
    # rank 0's first query has a second positive (in rank 1's groups), so the ranks' positive_ids differ in width
    "masked_positives": dict(cross_device=True, scale_by_world_size=True, masked=True, positives=True),
}


def _global_data():
    """Deterministic inputs for the whole global batch of WORLD_SIZE*N queries."""
    g = torch.Generator().manual_seed(1234)
    xq = torch.randn(WORLD_SIZE * N, D_IN, generator=g)
    xp = torch.randn(WORLD_SIZE * N * G, D_IN, generator=g)
    # passage ids with duplicates across ranks (rank 1's first positive is a negative of rank 0's query 0)
    ids = torch.arange(WORLD_SIZE * N * G)
    ids[1] = ids[N * G]
    return xq, xp, ids


def _encoder():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(D_IN, D), torch.nn.Tanh())


def _positives(ids, queries):
    """Each of `queries`' labelled positives, padded with -1 to the most any of them has (as a micro-batch's
    collate pads them): query 0 also has rank 1's second passage."""
    lists = [[int(ids[i * G])] + ([int(ids[N * G + 1])] if i == 0 else []) for i in queries]
    width = max(map(len, lists))
    return torch.tensor([row + [-1] * (width - len(row)) for row in lists])


def _loss_and_grads(xq, xp, ids, kwargs, queries):
    kwargs = dict(kwargs)
    masked = kwargs.pop("masked", False)
    positives = _positives(ids, queries) if kwargs.pop("positives", False) else None
    encoder = _encoder()
    loss = contrastive_loss(encoder(xq), encoder(xp), G, passage_ids=ids[[i * G + j for i in queries for j in range(G)]]
                            if masked else None, positive_ids=positives, **kwargs)
    loss.backward()
    return loss.detach(), [prm.grad.detach().clone() for prm in encoder.parameters()]


def _worker(rank, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=60))
    try:
        xq, xp, ids = _global_data()
        local = slice(rank * N, (rank + 1) * N), slice(rank * N * G, (rank + 1) * N * G)
        results = {}
        for name, kwargs in CONFIGS.items():
            loss, grads = _loss_and_grads(xq[local[0]], xp[local[1]], ids, kwargs, range(rank * N, (rank + 1) * N))
            for grad in grads:  # what DDP does: average the gradients over processes
                dist.all_reduce(grad, op=dist.ReduceOp.SUM)
                grad /= WORLD_SIZE
            results[name] = {"loss": loss, "grads": grads}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out_dir = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD_SIZE)]


def _single_process(name):
    xq, xp, ids = _global_data()
    return _loss_and_grads(xq, xp, ids, CONFIGS[name], range(WORLD_SIZE * N))


def _assert_grads_close(actual, expected):
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["scaled", "scaled_tau_masked", "masked_positives"])
def test_cross_device_scaled_matches_single_process(two_process_results, name):
    """2 processes × N with ×W == 1 process × 2N: the same loss (only its gradient is scaled, so that it logs
    as one process's, and a FLOPS or distillation term added to it keeps its own scale) and the same averaged
    grads."""
    single_loss, single_grads = _single_process(name)
    for rank_results in two_process_results:
        res = rank_results[name]
        torch.testing.assert_close(res["loss"], single_loss, rtol=1e-5, atol=1e-5)
        _assert_grads_close(res["grads"], single_grads)


def test_cross_device_unscaled_grads_are_one_over_world_size(two_process_results):
    """RetroMAE (no ×W): same loss, but the DDP-averaged gradients are 1/W of the single-process ones."""
    single_loss, single_grads = _single_process("scaled")
    for rank_results in two_process_results:
        res = rank_results["unscaled"]
        torch.testing.assert_close(res["loss"], single_loss, rtol=1e-5, atol=1e-5)
        _assert_grads_close([g * WORLD_SIZE for g in res["grads"]], single_grads)
        assert not torch.allclose(res["grads"][0], single_grads[0], rtol=1e-3, atol=1e-6)


def test_cross_device_docs_only_losses_average_to_single_process(two_process_results):
    """LexMAE (queries local, targets offset by rank*N*G): the mean of the per-process losses is the
    single-process loss; each process scores only its own queries, so the losses differ per rank."""
    single_loss, _ = _single_process("scaled")
    losses = torch.stack([r["docs_only"]["loss"] for r in two_process_results])
    torch.testing.assert_close(losses.mean(), single_loss, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(losses[0], losses[1])
