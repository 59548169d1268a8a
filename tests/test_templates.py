import pytest

from reprolib.data.templates import TEMPLATES, get_template
from reprolib.errors import ReprolibError


def test_recipe_templates_follow_the_recipes():
    assert get_template("openmatch").render("T", "body") == "Title: T Text: body"
    assert get_template("openmatch").render("", "body") == "Title:  Text: body"  # missing field -> ""
    assert get_template("retromae").render("T", "body") == "T[SEP]body"
    assert get_template("tevatron").render("T", "body") == "T body"    # the HF set's join (correction 8)
    assert get_template("tevatron").render("", "body") == "body"
    assert get_template("retromae_pretrain").render("ab", "body") == "body"  # titles of <= 2 chars dropped
    assert get_template("lexmae").render("T", "body") == "T[SEP]body"     # one segment (correction 7)
    assert get_template("lexmae").render("", "body") == "-[SEP]body"      # LexMAE writes "-" for no title
    assert get_template("plain").render("", "body") == "body"
    assert get_template("retromae").render("T", "body", sep="</s>") == "T</s>body"


def test_disentangled_makes_the_title_a_sentence():
    """docs/recipes.md correction 1: TREC-COVID's CORD-19 titles are kept, as `title. body`."""
    render = get_template("disentangled").render
    assert render("Masks work", "A trial.") == "Masks work. A trial."
    assert render("Do masks work?", "A trial.") == "Do masks work? A trial."   # already ends a sentence
    assert render(" ", " A trial. ") == "A trial."                            # MS MARCO: no title


def test_max_lengths_per_recipe():
    assert (TEMPLATES["retromae"].query_max_len, TEMPLATES["retromae"].passage_max_len) == (32, 140)
    assert TEMPLATES["openmatch"].passage_max_len == 128
    assert TEMPLATES["lexmae"].passage_max_len == 144
    assert TEMPLATES["disentangled"].query_max_len == 24


def test_unknown_template():
    with pytest.raises(ReprolibError, match="unknown text template 'nope'"):
        get_template("nope")
