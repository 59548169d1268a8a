"""How each recipe turns (title, text) into model input, and its max lengths (docs/recipes.md §6).

Max lengths count [CLS]/[SEP]. `{sep}` is the tokenizer's separator token, filled at tokenization
time (RetroMAE and Tevatron write the literal "[SEP]", which BERT tokenizers map to the SEP id).
"""
from dataclasses import dataclass

from reprolib.errors import ReprolibError


@dataclass(frozen=True)
class Template:
    passage: str          # format string over {title}, {text}, {sep}
    query_max_len: int
    passage_max_len: int
    drop_empty_title: bool = False  # OpenMatch keeps "Title:  Text: ..."; RetroMAE pretraining drops short titles
    empty_title: str = ""           # what stands for a missing title (LexMAE writes "-")
    title_as_sentence: bool = False  # Disentangled: a title not ending a sentence gets a "."

    def render(self, title, text, sep="[SEP]"):
        if self.drop_empty_title and len(title) <= 2:
            return text
        if self.title_as_sentence:
            title, text = title.strip(), text.strip()
            if title and title[-1] not in SENTENCE_ENDS:
                title += "."
        return self.passage.format(title=title or self.empty_title, text=text, sep=sep).strip()


SENTENCE_ENDS = "!.?。！？"


TEMPLATES = {
    "plain": Template("{title} {text}", 32, 256),                 # BEIR + sentence-transformers; BM25
    "retromae": Template("{title}{sep}{text}", 32, 140),           # RMAE msmarco preprocess (pre-truncated at 150)
    "retromae_beir": Template("{text}", 32, 144),                  # RMAE BEIR fine-tuning: no title
    "retromae_pretrain": Template("{title} {text}", 32, 150, drop_empty_title=True),
    "openmatch": Template("Title: {title} Text: {text}", 32, 128),
    "tevatron": Template("{title} {text}", 32, 128),               # the 0.322 example (q_max_len 16), correction 8
    "lexmae": Template("{title}{sep}{text}", 32, 144, empty_title="-"),  # one segment, cut at the end (§4.1)
    "disentangled": Template("{title} {text}", 24, 128, title_as_sentence=True),  # correction 1 (TREC-COVID)
}


def get_template(name):
    """The template named `name`; a Template itself is returned as it is."""
    if isinstance(name, Template):
        return name
    if name not in TEMPLATES:
        raise ReprolibError(f"unknown text template {name!r}; choose from {', '.join(TEMPLATES)}")
    return TEMPLATES[name]
