"""Benchmark: do SciFact's distilled students learn their teacher on the training queries it scored?

    .venv/bin/python bench/distill_train_queries.py      # after `reprolib run params/scifact_minilm.yaml`; ~2 min

Retrieves SciFact's 809 training queries with stage 2 (`finetune_hn`, the control) and each distilled student of
`params/scifact_minilm.yaml` (each with its own index), and compares them on train nDCG@10 with a paired
randomization test, beside the teacher's own ranking of its scored passages (`teacher/teacher_scores.tsv`, the
fused top 30 of each query). A student that falls below the control here has not learned the teacher even where it
was taught. Also counts how often the teacher ranks a negative above the labelled positive: its top passage, and
the chance that a group of the positive and 3 of its other scored passages (as the students draw them) holds one.
Extra students trained as stages `distill_<name>` beside `index_<name>` are picked up too, and a `--seeds`
copy (`distill_klc_seed43`) is compared with the control of its seed. Skips (exit 0) when the
pipeline's outputs are absent.
"""
import argparse
from pathlib import Path

from benchutil import REPO, RESULTS, header, require_run_outputs, write_json

CONTROL = ("finetune_hn", "index_hn")
NEGATIVES_PER_GROUP = 3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", type=Path, default=REPO / "outputs" / "scifact_minilm")
    parser.add_argument("--out", type=Path, default=RESULTS / "distill_train_queries.json")
    args = parser.parse_args(argv)
    run_dir = args.run_dir
    needed = ["data", "teacher/teacher_scores.tsv", *(f"{name}/model" if name.startswith("finetune") else f"{name}/index"
                                                      for name in CONTROL)]
    require_run_outputs(run_dir, needed, "scifact_minilm.yaml")

    from reprolib.data import Corpus, read_qrels
    from reprolib.data.formats import read_scores
    from reprolib.data.layout import find_qrels_file, load_queries
    from reprolib.metrics import evaluate, paired_test
    from reprolib.modeling import load_encoder
    from reprolib.search import dense_search

    data = run_dir / "data"
    corpus, queries = Corpus.open(data, progress=False), load_queries(data, "train")
    qrels = read_qrels(find_qrels_file(data, "train"))
    teacher = read_scores(run_dir / "teacher" / "teacher_scores.tsv")

    def ndcg(run):
        return evaluate(run, qrels, "nDCG@10").per_query["nDCG@10"]

    def retrieve(model_stage, index_stage):
        encoder = load_encoder(str(run_dir / model_stage / "model"))
        return ndcg(dense_search(encoder, queries, run_dir / index_stage / "index", corpus, topk=100, progress=False))

    controls = {"": retrieve(*CONTROL)}   # per seed suffix: a `--seeds` copy is compared with its seed's control
    control = controls[""]
    students = {}
    for model_dir in sorted(run_dir.glob("distill_*/model")):
        name = model_dir.parent.name.removeprefix("distill_")
        if not (run_dir / f"index_{name}" / "index").exists():
            continue
        seed = name[name.rindex("_seed"):] if "_seed" in name else ""
        if seed not in controls and (run_dir / f"{CONTROL[0]}{seed}").exists():
            controls[seed] = retrieve(*(f"{stage}{seed}" for stage in CONTROL))
        test = paired_test(controls.get(seed, control), retrieve(f"distill_{name}", f"index_{name}"))
        students[name] = {"nDCG@10": round(test["mean_b"], 4), "difference": round(test["diff"], 4),
                          "p_randomization": round(test["p_randomization"], 4)}
        print(f"{name}: train nDCG@10 {test['mean_b']:.4f} vs control {test['mean_a']:.4f}, "
              f"{test['diff']:+.4f}, p {test['p_randomization']:.4f}")

    top_is_positive, group_has_inversion, judged = 0, 0.0, 0
    for qid, scores in teacher.items():
        positives = [pid for pid in scores if qrels.get(qid, {}).get(pid, 0) > 0]
        negatives = [pid for pid in scores if pid not in positives]
        if not positives or not negatives:
            continue
        judged += 1
        top_is_positive += max(scores, key=scores.get) in positives
        best = max(scores[pid] for pid in positives)
        above = sum(scores[pid] > best for pid in negatives) / len(negatives)
        group_has_inversion += 1 - (1 - above) ** NEGATIVES_PER_GROUP   # draws with replacement: close enough for 30
    result = header("distill_train_queries")
    result.update(
        run_dir=str(run_dir), queries=len(control),
        **{"teacher_nDCG@10": round(sum(ndcg(teacher).values()) / len(control), 4),
           "control_nDCG@10": round(sum(control.values()) / len(control), 4)},
        students=students,
        teacher_top_is_positive=round(top_is_positive / judged, 4),
        groups_with_a_negative_above_the_positive=round(group_has_inversion / judged, 4),
    )
    write_json(args.out, result)
    print(f"teacher {result['teacher_nDCG@10']}, control {result['control_nDCG@10']} on {len(control)} train queries; "
          f"teacher's top passage a positive for {result['teacher_top_is_positive']:.0%}, a group of 1 + "
          f"{NEGATIVES_PER_GROUP} with a negative above the positive {result['groups_with_a_negative_above_the_positive']:.0%}")


if __name__ == "__main__":
    main()
