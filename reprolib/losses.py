"""Training losses of the reproduced dense/sparse retrievers (pure torch). See docs/recipes.md §1.5, §2.4,
§3, §4.3, §5 and §6.

Batch layout (every recipe): queries `q` are [B, d]; passages `p` are [B*G, d], one group of G per
query laid out contiguously as [p+, n1 .. n_{G-1}], so query i's positive sits at row i*G.
Disentangled lays its candidates out as [all positives | all negatives] with target i; cross entropy
does not depend on the order of the candidates, so the grouped layout gives the same loss there.

Per-recipe settings
    =============  ============  =====================  ================  ==================================
    recipe         temperature   cross_device           ×W                distillation
    =============  ============  =====================  ================  ==================================
    RetroMAE       1.0           yes (q and p)          no                kl_distillation(reduction="mean")
    OpenMatch      none (1.0)    optional (q and p)     yes               margin_mse, or KL "mean"
    Tevatron v1    none (1.0)    optional (q and p)     yes               none
    LexMAE         1.0           docs only              no                kl_distillation("batchmean")
    Disentangled   1.0           always (q, p, ids)     yes               margin_mse
    =============  ============  =====================  ================  ==================================
    LexMAE gathers the passages only (`gather_queries=False`); its queries stay local and their targets
    are offset by rank*B*G. Disentangled masks false negatives (`passage_ids`, `positive_ids`).
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

# Disentangled fills masked false negatives with -10000 (contrast_utils.py); it is finite in fp16.
FALSE_NEGATIVE_FILL = -10000.0


def _rank_and_world_size():
    """(rank, world size) of the default process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(t):
    """Concatenate `t` from every process along dim 0; the local slice keeps its gradient.

    `dist.all_gather` returns plain copies with no autograd history, so the local copy is swapped for
    `t` itself: gradients reach this process's own rows only. Every process must pass the same shape
    (use drop_last). Without an initialized process group, or with one process, `t` is returned as is.
    """
    rank, world_size = _rank_and_world_size()
    if world_size == 1:
        return t
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(world_size)]
    dist.all_gather(parts, t)
    parts[rank] = t
    return torch.cat(parts, dim=0)


def _pad_to_widest(positive_ids):
    """[B, K] padded with -1 to the widest K of every process: each pads its micro-batch to its own queries' most
    positives, and all_gather takes one shape."""
    if _rank_and_world_size()[1] == 1:
        return positive_ids
    width = torch.tensor(positive_ids.shape[1], device=positive_ids.device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX)
    return F.pad(positive_ids, (0, int(width) - positive_ids.shape[1]), value=-1)


def false_negative_mask(passage_ids, targets, positive_ids=None):
    """Boolean [num_queries, num_passages]: True where a passage is a labelled positive of the query
    other than its own target (Disentangled's false-negative masking, docs/recipes.md §5).

    passage_ids: [num_passages] integer ids of the candidate passages.
    targets: [num_queries] index of each query's own positive among the candidates.
    positive_ids: optional [num_queries, K] ids of all labelled positives of each query, padded with
        any negative number; by default each query's positives are just its target's id.
    """
    if positive_ids is None:
        positive_ids = passage_ids[targets].unsqueeze(1)
    positive_ids = positive_ids.to(passage_ids.device)
    hits = (positive_ids.unsqueeze(2) == passage_ids.view(1, 1, -1)) & (positive_ids.unsqueeze(2) >= 0)
    mask = hits.any(dim=1)
    mask[torch.arange(len(targets), device=mask.device), targets] = False
    return mask


def contrastive_loss(
    q,
    p,
    group_size,
    temperature=1.0,
    cross_device=False,
    scale_by_world_size=False,
    gather_queries=True,
    passage_ids=None,
    positive_ids=None,
):
    """Mean cross entropy of q·pᵀ/τ against every passage of the (gathered) batch: the query's own
    positive (row i*G) versus its hard negatives and all other queries' passages (in-batch negatives).

    q: [B, d]; p: [B*G, d] grouped as [p+, n1 .. n_{G-1}] per query; group_size: G.
    cross_device: all_gather q and p across processes (`gather_with_grad`), so the negatives come from
        the global batch; every process then computes the same global loss (RetroMAE, OpenMatch,
        Tevatron, Disentangled). With `gather_queries=False` only the passages are gathered and each
        process scores its own queries, whose targets are offset by rank*B*G (LexMAE).
    scale_by_world_size: multiply the loss's gradient by the world size W (when cross_device and W > 1);
        its value stays the global batch's cross entropy, so that it logs as one process would.
    passage_ids / positive_ids: when passage_ids ([B*G] integer ids) is given, candidates that are
        labelled positives of a query other than its own target get FALSE_NEGATIVE_FILL (Disentangled);
        see `false_negative_mask`. Both are gathered along with p and q.
    """
    rank, world_size = _rank_and_world_size() if cross_device else (0, 1)
    num_local_queries = q.shape[0]
    if p.shape[0] != num_local_queries * group_size:
        raise ValueError(f"expected {num_local_queries * group_size} passages (B*G), got {p.shape[0]}")
    if cross_device:
        p = gather_with_grad(p)
        passage_ids = None if passage_ids is None else gather_with_grad(passage_ids)
        if gather_queries:
            q = gather_with_grad(q)
            positive_ids = None if positive_ids is None else gather_with_grad(_pad_to_widest(positive_ids))

    scores = q @ p.T / temperature
    first_query = 0 if (gather_queries or not cross_device) else rank * num_local_queries
    targets = (torch.arange(q.shape[0], device=q.device) + first_query) * group_size
    if passage_ids is not None:
        scores = scores.masked_fill(false_negative_mask(passage_ids, targets, positive_ids), FALSE_NEGATIVE_FILL)
    loss = F.cross_entropy(scores, targets)

    # DDP averages gradients over the W processes, and all_gather carries no gradient back to the
    # process that produced a gathered row, so each process's backward yields only its own rows'
    # share of the global gradient: ×W turns DDP's mean of those shares into their sum, the exact
    # single-process gradient on the global batch. Without it (RetroMAE) gradients are 1/W of that.
    # Only the gradient is scaled: a FLOPS or distillation term added to this loss is not gathered.
    if cross_device and scale_by_world_size and world_size > 1:
        loss = _scale_gradient(loss, world_size)
    return loss


def _scale_gradient(x, factor):
    """`x` in value (exactly: x - x.detach() is 0), `factor` × its gradient."""
    return x.detach() + (x - x.detach()) * factor


def group_scores(q, p, group_size):
    """[B, G] scores of each query against its own group only: row i is q_i · p_{iG .. iG+G-1}."""
    return torch.einsum("bd,bgd->bg", q, p.view(q.shape[0], group_size, -1))


def kl_distillation(student_scores, teacher_scores, temperature=1.0, reduction="mean"):
    """KL(teacher ‖ student) = KLDivLoss(log_softmax(student/τ), softmax(teacher)) over the last dim.

    Scores are [B, G] (each query's own group). The teacher's raw scores are used without temperature
    and without gradient. reduction="mean" divides the summed KL by B*G (RetroMAE, OpenMatch
    listwise); "batchmean" divides by B (LexMAE, which also weights the term by τ², 1 at τ=1).
    """
    if reduction not in ("mean", "batchmean", "sum"):
        raise ValueError(f"reduction must be 'mean', 'batchmean' or 'sum', not {reduction!r}")
    log_student = F.log_softmax(student_scores / temperature, dim=-1)
    teacher = F.softmax(teacher_scores.detach(), dim=-1)
    total = F.kl_div(log_student, teacher, reduction="sum")
    # spelled out: torch warns that its own "mean" will come to mean "batchmean"
    if reduction == "mean":
        return total / log_student.numel()
    if reduction == "batchmean":
        return total / log_student.shape[0]
    return total


def margin_mse(student_pos, student_neg, teacher_pos, teacher_neg):
    """Margin-MSE: mean over (query, negative) of ((s+ − s−) − (t+ − t−))² (OpenMatch pairwise,
    Disentangled distill). Positives are [B] (or [B, 1]) and negatives [B] or [B, n]; teacher scores
    are raw cross-encoder logits, used without gradient."""
    if student_pos.dim() == student_neg.dim() - 1:
        student_pos = student_pos.unsqueeze(-1)
    if teacher_pos.dim() == teacher_neg.dim() - 1:
        teacher_pos = teacher_pos.unsqueeze(-1)
    student_margin = student_pos - student_neg
    teacher_margin = (teacher_pos - teacher_neg).detach()
    return F.mse_loss(student_margin, teacher_margin.to(student_margin.dtype))


def cross_encoder_loss(logits, kind="listwise"):
    """Loss of cross-encoder logits [B, G] whose column 0 is each query's positive.

    listwise: cross entropy of the positive against its group (RetroMAE's reranker, 1 + 64 passages);
    bce: binary cross entropy per pair, label 1 for the positive and 0 for the negatives (mean over B·G).
    """
    if kind == "listwise":
        return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))
    if kind == "bce":
        labels = torch.zeros_like(logits)
        labels[:, 0] = 1.0
        return F.binary_cross_entropy_with_logits(logits, labels)
    raise ValueError(f"cross-encoder loss must be 'listwise' or 'bce', not {kind!r}")


def flops_regularizer(x):
    """FLOPS(X) = Σ_v (mean_i |X_iv|)² for sparse representations X [N, V] (SPLADE / LexMAE §4.3)."""
    return x.abs().mean(dim=0).pow(2).sum()
