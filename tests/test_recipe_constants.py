"""Each recipe YAML's fine-tuning stage against the constants table of docs/recipes.md §6: lengths, group
size, learning rate, epochs, the ×world-size loss factor and the passage template. A YAML edited away from
its recipe notes (or notes edited away from the YAML) fails here."""
import re
from pathlib import Path

import pytest

from reprolib.pipeline import load_pipeline

ROOT = Path(__file__).parent.parent
# column of the table -> (YAML, its first fine-tuning stage, the template that writes the table's passage text)
RECIPES = {
    "RetroMAE": ("retromae_finetune_msmarco.yaml", "finetune", "retromae"),
    "OpenMatch": ("openmatch_t5_msmarco.yaml", "finetune", "openmatch"),
    "Tevatron v1": ("tevatron_bert_msmarco.yaml", "finetune", "tevatron"),
    "LexMAE": ("lexmae_msmarco.yaml", "finetune", "lexmae"),
    "Disentangled": ("disentangled_contrast_msmarco.yaml", "finetune", "disentangled"),
}


def constants_table():
    """{row name: {recipe: cell}} from the markdown table under '## 6. Constants side by side'."""
    text = (ROOT / "docs" / "recipes.md").read_text(encoding="utf-8")
    section = text.split("## 6. Constants side by side", 1)[1].split("\n## ", 1)[0]
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in section.splitlines() if line.startswith("|") and not line.startswith("|---")]
    header, body = rows[0], rows[1:]
    return {row[0]: dict(zip(header[1:], row[1:])) for row in body}


TABLE = constants_table()


@pytest.mark.parametrize("recipe", RECIPES)
def test_fine_tuning_stage_matches_the_recipe_notes(recipe):
    yaml_name, stage_id, template = RECIPES[recipe]
    stage = next(s for s in load_pipeline(ROOT / "params" / yaml_name).stages if s.id == stage_id)
    params = stage.params

    query_len, passage_len = (int(x) for x in TABLE["query / passage length"][recipe].split("/"))
    assert (params["query_max_len"], params["passage_max_len"]) == (query_len, passage_len)

    negatives = int(re.match(r"1 \+ (\d+)", TABLE["group"][recipe]).group(1))
    assert params["group_size"] == 1 + negatives

    lr, epochs = re.match(r"([\d.e-]+) / (\d+)", TABLE["lr / epochs"][recipe]).groups()
    assert params["learning_rate"] == pytest.approx(float(lr)) and params["epochs"] == int(epochs)

    scaled = TABLE["loss × world size"][recipe] == "yes"
    if params.get("cross_device"):
        assert params.get("scale_loss_by_world_size", True) == scaled
    assert params["template"] == template


def test_the_table_names_every_recipe():
    assert set(TABLE["query / passage length"]) == set(RECIPES)


def _stage(yaml_name, stage_id):
    return next(s for s in load_pipeline(ROOT / "params" / yaml_name).stages if s.id == stage_id)


@pytest.mark.parametrize("yaml_name, stage_id, query_len", [
    ("tevatron_bert_msmarco.yaml", "eval", 32),            # trains at 16, evaluates dev queries at 32
    ("disentangled_contrast_msmarco.yaml", "eval", 512),    # evaluate/index_utils.py: 512 for queries too
    ("disentangled_contrast_msmarco.yaml", "covid_eval", 512),
    ("disentangled_distill_msmarco.yaml", "zero_shot", 512),
    ("retromae_beir.yaml", "zero_shot", 512),               # sentence-transformers' Transformer(model): 512
])
def test_evaluation_query_lengths_are_the_originals(yaml_name, stage_id, query_len):
    """docs/recipes.md correction 2: evaluation lengths are not training lengths."""
    assert _stage(yaml_name, stage_id).params["query_max_len"] == query_len


def test_openmatch_mines_its_default_retrieval_depth():
    """docs/recipes.md correction 9: OpenMatch's "top 200" mining retrieves 100 deep."""
    assert _stage("openmatch_t5_msmarco.yaml", "mine").params["depth"] == 100


def test_lexmae_flops_weights_by_stage():
    """§4.3: λ_d 0.002 in stage 1, 0.008 in stages 2 and 3 (queries get 0.75 λ_d by default)."""
    weights = [float(w) for w in TABLE["FLOPS λ_d by stage"]["LexMAE"].split("/")]
    stages = [_stage("lexmae_msmarco.yaml", sid) for sid in ("finetune", "finetune_hn", "finetune_distill")]
    assert [s.params["flops_passage_weight"] for s in stages] == weights
    assert all(s.params.get("flops_query_weight") is None for s in stages)
