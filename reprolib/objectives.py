"""What `reprolib.training.train` optimises: one class per objective, chosen by `TrainConfig.objective`.

    contrastive  DenseEncoder on query groups (1 positive + G-1 negatives): in-batch and
                 cross-device cross entropy (docs/recipes.md §1.5, §2.4, §3, §5); with `teacher_scores`,
                 distillation (KL or Margin-MSE on each query's group) + contrastive_weight x that
    sparse       SparseEncoder on the same groups: the same losses + FLOPS regulariser on
                 queries and passages, λ_q = 0.75·λ_d by default (LexMAE fine-tuning, §4.3)
    cross_encoder  CrossEncoder on the same groups: listwise cross entropy over each group (RetroMAE's
                 reranker) or per-pair binary cross entropy
    retromae     BertForMaskedLM + the enhanced-decoding layer on corpus passages (§1.1-1.2)
    lexmae       BertForMaskedLM + the lexicon-bottleneck decoder on (title, text) pairs (§4.1-4.2)

An objective (`build(config, corpus)`) holds `model` (the module the loop prepares and steps), `examples` (len, set_epoch(e),
examples[i]: a function of (seed, epoch, i)), `loss(model, items, device)` -> (loss, {part: value})
and `save(model, path)`. `loss_parts` names the extra columns of train_log.csv.
"""
from pathlib import Path

from reprolib.errors import ReprolibError


def load_groups(config, sep):
    """The TrainGroups of a config: corpus, split queries, qrels and negatives (and teacher scores)."""
    from reprolib.data import Corpus, read_qrels
    from reprolib.data.groups import TrainGroups, negative_positions, teacher_table
    from reprolib.data.layout import find_qrels_file, load_queries

    corpus = Corpus.open(config.corpus or config.train_data, progress=False)
    queries = load_queries(config.train_data, config.split)
    qrels = read_qrels(find_qrels_file(config.train_data, config.split))
    teacher = teacher_table(config.teacher_scores, corpus, qids=qrels) if config.teacher_scores else None
    negatives_file = config.negatives
    if negatives_file is None and teacher is None:
        default = Path(config.train_data) / f"{config.split}.negatives.tsv"
        negatives_file = default if default.is_file() else None
    if isinstance(negatives_file, list):   # one group per query and file (TrainConfig.check: not with a teacher)
        negatives = [negative_positions(path, corpus, qids=qrels) for path in negatives_file]
    else:
        negatives = negative_positions(negatives_file, corpus, qids=qrels) if negatives_file else {}
    if teacher is not None:
        qrels, negatives = _scored_only(qrels, negatives if negatives_file else None, teacher, corpus)
    return TrainGroups(corpus, queries, qrels, negatives, group_size=config.group_size, sampler=config.sampler,
                       sample_neg_from_topk=config.sample_neg_from_topk, per_query=config.per_query,
                       template=config.template, sep=sep, seed=config.seed, teacher=teacher,
                       without_negatives=config.without_negatives)


def _scored_only(qrels, negatives, teacher, corpus):
    """Qrels and negatives restricted to the pairs the teacher scored. Without a negatives file the
    negatives are the teacher's scored passages that are not positives, in the scores file's order
    (Disentangled samples them from the cross-encoder scores; RetroMAE's teacher scored its negatives).
    `negatives`: {qid: corpus positions} (`negative_positions`); `teacher`: a `teacher_table`."""
    import numpy as np

    nothing = np.zeros(0, np.int32)
    scored_qrels, scored_negatives = {}, {}
    for qid, judged in qrels.items():
        scored = teacher.get(qid, (nothing, None))[0]
        judged_positions = corpus.positions(list(judged))
        scored_qrels[qid] = {pid: rel for (pid, rel), p in zip(judged.items(), judged_positions) if p in scored}
        if negatives is None:
            positives = [p for (pid, rel), p in zip(judged.items(), judged_positions) if rel > 0]
            scored_negatives[qid] = scored[~np.isin(scored, positives)]
        else:
            ranked = negatives.get(qid, nothing)
            scored_negatives[qid] = ranked[np.isin(ranked, scored)]
    return scored_qrels, scored_negatives


def _init_model(config, corpus):
    """The config's model as a loadable path (a "scratch:<size>" model is built under out_dir/init first)."""
    from reprolib.modeling.specs import resolve_model

    return resolve_model(config.model, corpus, Path(config.out_dir) / "init", seed=config.seed)


def load_encoder(config, corpus):
    """The DenseEncoder (SparseEncoder for the sparse objective) a config fine-tunes."""
    if config.objective == "sparse":
        from reprolib.modeling.sparse import SparseEncoder

        return SparseEncoder.from_pretrained(_init_model(config, corpus), query_max_len=config.query_max_len,
                                             passage_max_len=config.passage_max_len, template=config.template,
                                             dropout=config.dropout)
    from reprolib.modeling import DenseEncoder

    return DenseEncoder.from_pretrained(
        _init_model(config, corpus), pooling=config.pooling, normalize=config.normalize,
        projection_dim=config.projection_dim, untie=config.untie or None, t5_mode=config.t5_mode,
        query_max_len=config.query_max_len, passage_max_len=config.passage_max_len, template=config.template,
        dropout=config.dropout)


def collate(encoder, items, device):
    """Tokenized queries and passages of a micro-batch of groups, plus corpus positions for
    false-negative masking."""
    import torch

    queries = [item.query for item in items]
    passages = [text for item in items for text in item.texts]
    query_batch = {k: v.to(device) for k, v in encoder.tokenize(queries, "query").items()}
    # B*G passages vary in length far more than B queries: length-sorted buckets of B waste little padding
    passage_batch = encoder.tokenize_buckets(passages, "passage", bucket_size=max(len(items), 8)).to(device)
    passage_ids = torch.tensor([p for item in items for p in item.positions], device=device)
    width = max(len(item.positives) for item in items)
    positive_ids = torch.tensor([item.positives + [-1] * (width - len(item.positives)) for item in items], device=device)
    return query_batch, passage_batch, passage_ids, positive_ids


class Contrastive:
    def __init__(self, config, encoder, groups=None):
        self.config = config
        self.model = encoder
        self.examples = groups
        self.loss_parts = ("ranking_loss", "distill_loss") if config.distillation else ()

    @classmethod
    def build(cls, config, corpus):
        encoder = load_encoder(config, corpus)
        return cls(config, encoder, load_groups(config, encoder.sep_token))

    def ranking_loss(self, model, items, device):
        """Cross entropy over the (gathered) batch, and the query and passage vectors it scored."""
        from reprolib.losses import contrastive_loss

        config = self.config
        queries, passages, passage_ids, positive_ids = collate(self.model, items, device)
        q, p = model(query=queries, passage=passages)
        masking = config.false_negative_masking
        loss = contrastive_loss(
            q.float(), p.float(), config.group_size, temperature=config.temperature,
            cross_device=config.cross_device, scale_by_world_size=config.scale_loss_by_world_size,
            gather_queries=config.gather_queries,
            passage_ids=passage_ids if masking else None, positive_ids=positive_ids if masking else None)
        return loss, q, p

    def loss(self, model, items, device):
        return self.retrieval_loss(model, items, device)[:2]

    def retrieval_loss(self, model, items, device):
        """(loss, parts, q, p): the ranking cross entropy, or with teacher scores the distillation loss +
        contrastive_weight x the ranking cross entropy."""
        ranking, q, p = self.ranking_loss(model, items, device)
        config = self.config
        if not config.distillation:
            return ranking, {}, q, p
        import torch

        teacher = torch.tensor([item.teacher for item in items], dtype=torch.float32, device=device)
        distill = distillation_loss(config.distillation, q.float(), p.float(), teacher, config.temperature)
        loss = distill + config.contrastive_weight * ranking
        return loss, {"ranking_loss": ranking.item(), "distill_loss": distill.item()}, q, p

    def save(self, model, path):
        model.save(path)

    def summary(self):
        return {"examples": len(self.examples), "skipped_queries": len(self.examples.skipped_queries),
                "passages_per_query": self.config.group_size}


class Sparse(Contrastive):
    def __init__(self, config, encoder, groups=None):
        super().__init__(config, encoder, groups)
        self.loss_parts = ("ranking_loss", *self.loss_parts[1:], "flops_query", "flops_passage")

    @classmethod
    def build(cls, config, corpus):
        """As the contrastive objective; a head that switches on too many terms first gets its bias shifted so
        that passages start sparse (`calibrate_head`)."""
        import logging

        objective = super().build(config, corpus)
        before, after = calibrate_head(objective.model, objective.examples)
        if after != before:
            logging.getLogger(__name__).warning("MLM head: bias shifted so that a passage starts with %.0f non-zero "
                                                "terms instead of %.0f", after, before)
        return objective

    def loss(self, model, items, device):
        from reprolib.losses import flops_regularizer

        config = self.config
        loss, parts, q, p = self.retrieval_loss(model, items, device)
        parts.setdefault("ranking_loss", loss.item())
        flops_q, flops_p = flops_regularizer(q.float()), flops_regularizer(p.float())
        loss = loss + config.flops_query_weight * flops_q + config.flops_passage_weight * flops_p
        return loss, {**parts, "flops_query": flops_q.item(), "flops_passage": flops_p.item()}


CALIBRATION_PASSAGES = 64


def calibrate_head(encoder, groups):
    """Start a SparseEncoder sparse: a head that switches on more than a few hundred terms per passage gets its
    bias shifted down to that (`SparseEncoder.calibrate_bias`, on 64 passages spread over the groups' corpus).
    That is every head new to its checkpoint (logits centred on zero: the whole vocabulary) and an MLM head
    (its bias is free, as the softmax ignores it: LexMAE-pretrained all-MiniLM-L6-v2 on SciFact starts with
    thousands). A retriever that is already sparse is left alone. Returns (non-zeros per passage before, after)."""
    import numpy as np

    spread = np.linspace(0, len(groups.corpus) - 1, CALIBRATION_PASSAGES).astype(int)
    return encoder.calibrate_bias([groups.passage_text(int(p)) for p in spread], denser_only=True)


def distillation_loss(kind, q, p, teacher, temperature=1.0):
    """The student's scores of each query's own group (q·p/τ, [B, G], positive first) against the teacher's
    raw scores [B, G]: kl = KL(teacher ‖ student) averaged over B·G (RetroMAE), kl_batchmean over B
    (LexMAE), margin_mse = MSE of the positive-minus-negative margins (Disentangled, OpenMatch)."""
    from reprolib.losses import group_scores, kl_distillation, margin_mse

    student = group_scores(q, p, teacher.shape[1]) / temperature
    if kind == "margin_mse":
        return margin_mse(student[:, 0], student[:, 1:], teacher[:, 0], teacher[:, 1:])
    return kl_distillation(student, teacher, reduction="batchmean" if kind == "kl_batchmean" else "mean")


class CrossEncoderObjective(Contrastive):
    """A cross-encoder on the contrastive groups: logits [B, G] of (query, passage) pairs, positive first."""

    @classmethod
    def build(cls, config, corpus):
        from reprolib.modeling.cross_encoder import CrossEncoder

        model = CrossEncoder.from_pretrained(_init_model(config, corpus), max_len=config.passage_max_len,
                                             dropout=config.dropout, exact_match=config.exact_match)
        return cls(config, model, load_groups(config, model.sep_token))

    def loss(self, model, items, device):
        from reprolib.losses import cross_encoder_loss

        pairs = [(item.query, text) for item in items for text in item.texts]
        batch = self.model.tokenize_buckets(pairs, "passage", bucket_size=max(len(items), 8)).to(device)
        logits = model(passage=batch)[1].float().view(len(items), -1)
        return cross_encoder_loss(logits, self.config.cross_encoder_loss), {}


class Pretraining:
    """RetroMAE or LexMAE pretraining (`config.objective`); saves the BertForMaskedLM alone (a BertForPreTraining
    with next-sentence prediction). With decoder_loss_weight 0 (the MLM-only control) no decoder runs, and the log
    has no decoder_loss column; with nsp_loss_weight > 0 (the retromae objective only: BERT's next-sentence
    prediction) it has an nsp_loss column."""

    @classmethod
    def build(cls, config, corpus):
        return cls(config, corpus)

    def __init__(self, config, corpus):
        from transformers import AutoTokenizer

        from reprolib.data.pretraining import PretrainingExamples, build_sequences
        from reprolib.data.templates import get_template

        self.config = config
        decoder, nsp = bool(config.decoder_loss_weight), bool(config.nsp_loss_weight)
        self.loss_parts = ("encoder_loss",) + ("decoder_loss",) * decoder + ("nsp_loss",) * nsp
        path = _init_model(config, corpus)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        template = get_template(config.template)
        max_length = config.passage_max_len or template.passage_max_len
        sequences = build_sequences(corpus, self.tokenizer, config.objective, max_length, template=template,
                                    progress=config.progress, pack=config.pack)
        self.examples = PretrainingExamples(sequences, self.tokenizer, config.objective,
                                            encoder_ratio=config.encoder_mask_ratio,
                                            decoder_ratio=config.decoder_mask_ratio, seed=config.seed,
                                            decoder=decoder, nsp=nsp)
        if config.objective == "retromae":
            from reprolib.modeling.retromae import RetroMAEForPretraining

            self.model = RetroMAEForPretraining.from_pretrained(path, decoder_weight=config.decoder_loss_weight,
                                                                nsp_weight=config.nsp_loss_weight,
                                                                new_head=config.new_head, dropout=config.dropout)
        else:
            from reprolib.modeling.lexmae import LexMAEForPretraining

            self.model = LexMAEForPretraining.from_pretrained(path, decoder_layers=config.decoder_layers,
                                                              bottleneck=config.bottleneck,
                                                              bottleneck_layer_norm=config.bottleneck_layer_norm,
                                                              decoder_weight=config.decoder_loss_weight,
                                                              new_head=config.new_head, dropout=config.dropout)

    def loss(self, model, items, device):
        batch = {k: v.to(device) for k, v in self.examples.collate(items).items()}
        loss, *losses = model(**batch)            # encoder, decoder (and RetroMAE's next-sentence) losses
        parts = {name: value.item() for name, value in zip(("encoder_loss", "decoder_loss", "nsp_loss"), losses)
                 if value is not None}
        return loss, parts

    def save(self, model, path):
        model.save_pretrained(path, tokenizer=self.tokenizer)

    def summary(self):
        return {"examples": len(self.examples)}        # sequences are tokenized lazily: no token count


OBJECTIVES = {"contrastive": Contrastive, "sparse": Sparse, "cross_encoder": CrossEncoderObjective,
              "retromae": Pretraining,
              "lexmae": Pretraining}


def build_objective(config, corpus):
    if config.objective not in OBJECTIVES:
        raise ReprolibError(f"unknown objective {config.objective!r}; choose from {', '.join(OBJECTIVES)}")
    return OBJECTIVES[config.objective].build(config, corpus)


def group_score_matrix(encoder, groups, num_groups=200, batch_size=64):
    """[n, G] scores q·p of the first `num_groups` groups' passages (column 0: the positive), for dense
    (numpy) and sparse (scipy CSR) encodings; and the groups' items."""
    import numpy as np

    items = [groups[i] for i in range(min(num_groups, len(groups)))]
    queries = encoder.encode_queries([item.query for item in items], batch_size=batch_size)
    passages = encoder.encode_passages([text for item in items for text in item.texts], batch_size=batch_size)
    paired = queries[np.repeat(np.arange(len(items)), groups.group_size)]      # row i*G+j: query i
    if hasattr(paired, "multiply"):
        scores = np.asarray(paired.multiply(passages).sum(axis=1)).ravel()
    else:
        scores = np.einsum("nd,nd->n", paired, passages)
    return scores.reshape(len(items), groups.group_size), items


def score_groups(encoder, groups, num_groups=200, batch_size=64):
    """Scores of each group's positive and of its negatives, for the first `num_groups` groups: how well the
    encoder separates them (the notebooks plot the two distributions)."""
    scores, _ = group_score_matrix(encoder, groups, num_groups, batch_size)
    return scores[:, 0], scores[:, 1:].ravel()


def group_accuracy(positive_scores, negative_scores):
    """The share of groups whose positive outscores every one of its negatives (`score_groups`' two arrays); NaN
    for groups of a positive alone (group_size 1: in-batch negatives only), which have nothing to outscore."""
    import numpy as np

    if len(negative_scores) == 0:
        return float("nan")
    negatives = np.asarray(negative_scores).reshape(len(positive_scores), -1)
    return float(np.mean(np.asarray(positive_scores) > negatives.max(axis=1)))
