"""A synthetic retrieval dataset in MS MARCO layout, deterministic from a seed.

The world: entities of six types (city, river, compound, species, company, musician), each with
six attributes. Entities come in families of four that share a type and a generated stem word
("Brasiton Bay", "Brasiton Falls", ...). Every entity gets four passages; its six facts are spread
over them as 2 + 2 + 1 + 1, so each (entity, attribute) fact is stated in exactly one passage and
a query about it has exactly one relevant passage (unless `unlabelled_twins` restates it, below).

What makes it a useful teaching set:
  * paraphrase: passages and queries pick words from synonym sets independently ("founded" /
    "established" / "settled") and use different sentence shapes, so BM25 finds the entity by
    name but often misses the attribute word; `canonicalize` removes that gap to show the headroom;
  * hard negatives: the entity's other passages and its siblings' passages about the same attribute
    share the query's rarest words, and some passages mention an attribute without stating it;
  * learnable synonymy: synonyms fill identical template slots across the corpus, so MLM
    pretraining can learn that they are interchangeable.
  * sparse labels, on request (`unlabelled_twins`): a share of the facts is restated by another passage
    (or `twins_per_fact` others) of the same entity; dev judges every passage that states the fact, train labels
    one of them at random, as MS MARCO's annotators marked one answering passage of several. Off by default (the
    corpus is then unchanged).

Content is drawn from RNGs seeded by (seed, stream, index), so entity e can be generated alone:
the corpus is streamed to disk and memory stays bounded at any size up to 10M passages.
"""
import contextlib
import functools
import json
import math
import numbers
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from reprolib.errors import ReprolibError
from reprolib.fileio import atomic_write
from reprolib.progress import tqdm

GENERATOR_VERSION = "1"
MIN_PASSAGES, MAX_PASSAGES = 1_000, 10_000_000

# ---------------------------------------------------------------------------------------------
# Vocabulary. Each synonym set is keyed by its canonical (first) word; templates name a set as
# {key} and every rendering draws one member at random. A word belongs to one set only.
# ---------------------------------------------------------------------------------------------
SYNONYMS = {
    # type words
    "city": ("city", "town", "municipality"),
    "river": ("river", "stream", "waterway"),
    "compound": ("compound", "chemical", "substance"),
    "species": ("species", "animal", "creature"),
    "company": ("company", "firm", "corporation"),
    "musician": ("musician", "singer", "artist"),
    # attribute words
    "founded": ("founded", "established", "settled"),
    "residents": ("residents", "inhabitants", "citizens"),
    "province": ("province", "region", "district"),
    "mayor": ("mayor", "burgomaster", "reeve"),
    "elevation": ("elevation", "altitude", "height"),
    "famous": ("famous", "renowned", "celebrated"),
    "length": ("length", "extent", "reach"),
    "source": ("source", "origin", "headwaters"),
    "empties": ("empties", "flows", "pours"),
    "discharge": ("discharge", "outflow", "throughput"),
    "basin": ("basin", "catchment", "watershed"),
    "bridges": ("bridges", "crossings", "viaducts"),
    "discovered": ("discovered", "identified", "isolated"),
    "synthesized": ("synthesized", "prepared", "produced"),
    "chemist": ("chemist", "scientist", "researcher"),
    "colour": ("colour", "color", "hue"),
    "melting": ("melting", "fusion", "liquefaction"),
    "used": ("used", "employed", "applied"),
    "toxic": ("toxic", "poisonous", "harmful"),
    "habitat": ("habitat", "home", "range"),
    "diet": ("diet", "food", "nourishment"),
    "lifespan": ("lifespan", "longevity", "lifetime"),
    "weight": ("weight", "mass", "heft"),
    "status": ("status", "classification", "listing"),
    "described": ("described", "catalogued", "named"),
    "founder": ("founder", "creator", "originator"),
    "headquarters": ("headquarters", "base", "seat"),
    "employees": ("employees", "staff", "workers"),
    "products": ("products", "goods", "wares"),
    "revenue": ("revenue", "turnover", "income"),
    "genre": ("genre", "style", "idiom"),
    "plays": ("plays", "masters", "practises"),
    "debut": ("debut", "breakthrough", "premiere"),
    "label": ("label", "publisher", "imprint"),
    "hometown": ("hometown", "birthplace", "homeland"),
    "albums": ("albums", "records", "releases"),
}
CANONICAL = {word: words[0] for words in SYNONYMS.values() for word in words}
assert len(CANONICAL) == sum(len(words) for words in SYNONYMS.values()), "a word is in two synonym sets"


def canonicalize(text):
    """Lower-case `text` and replace every synonym by its set's canonical word."""
    return re.sub(r"[a-z]+", lambda m: CANONICAL.get(m.group(), m.group()), text.lower())


# Generated words: syllables are onset + one vowel, so a word's vowel count is its syllable
# count. Stems have three syllables and value words (places, people) two: they never collide.
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "tr", "st")
_SYLLABLES = tuple(onset + vowel for onset in _ONSETS for vowel in "aeiou")
_CODAS = ("", "n", "r", "l", "s", "th")


def _word(rng, syllables=2):
    return ("".join(rng.choice(_SYLLABLES) for _ in range(syllables)) + rng.choice(_CODAS)).capitalize()


# ---------------------------------------------------------------------------------------------
# Attribute values: factories returning `rng -> str`.
# ---------------------------------------------------------------------------------------------
def _number(lo, hi, unit=""):
    return lambda rng: f"{rng.randint(lo, hi)}{unit}"


def _one_of(*words):
    return lambda rng: rng.choice(words)


def _place(suffix=""):
    return lambda rng: _word(rng) + suffix


def _person(rng):
    return f"{_word(rng)} {_word(rng)}"


# ---------------------------------------------------------------------------------------------
# The world. Passage templates: {subj} is the entity (its name, or "the <type word>" after the
# first sentence), {value} the fact. Query templates: {name}, {type}. Queries use other sentence
# shapes than passages (paraphrase), and draw their synonyms independently.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Attribute:
    name: str
    value: Callable[[random.Random], str]
    passage: tuple        # templates that state the fact
    query: tuple          # templates that ask for it
    mention: str          # a sentence that names the attribute but not its value: a lexical trap


@dataclass(frozen=True)
class EntityType:
    name: str             # also the key of its synonym set
    name_format: str      # how stem and qualifier make an entity name
    qualifiers: tuple     # siblings in a family get distinct qualifiers
    attributes: tuple     # exactly ATTRIBUTES_PER_ENTITY


FOUNDED = Attribute(
    "founded", _number(1100, 2015),
    ("{subj} was {founded} in {value}.", "In {value}, {subj} was {founded}."),
    ("when was {name} {founded}", "what year was the {type} {name} {founded}", "{name}: year {founded}?"),
    "Accounts differ on when {subj} was {founded}.",
)

TYPES = (
    EntityType("city", "{stem} {qual}",
               ("Bay", "Ridge", "Falls", "Harbor", "Heights", "Crossing", "Springs", "Hollow", "Point", "Vale", "Ford", "Haven"), (
        FOUNDED,
        Attribute("population", _number(800, 3_000_000),
                  ("{subj} has about {value} {residents}.", "Some {value} {residents} live in {subj}."),
                  ("how many {residents} does {name} have", "number of {residents} of the {type} {name}", "{name} {residents} count"),
                  "The number of {residents} of {subj} keeps changing."),
        Attribute("province", _place(),
                  ("{subj} lies in the {value} {province}.", "{subj} is part of the {province} of {value}."),
                  ("which {province} is {name} in", "{name} belongs to what {province}", "the {type} {name} is in which {province}"),
                  "The borders of the {province} around {subj} have shifted over time."),
        Attribute("mayor", _person,
                  ("The {mayor} of {subj} is {value}.", "{value} serves as {mayor} of {subj}."),
                  ("who is the {mayor} of {name}", "{name} current {mayor}", "name the {mayor} of the {type} {name}"),
                  "The office of {mayor} of {subj} is elected every four years."),
        Attribute("elevation", _number(2, 3500, " metres"),
                  ("{subj} sits at an {elevation} of {value}.", "The {elevation} of {subj} is {value}."),
                  ("what is the {elevation} of {name}", "{name} {elevation} above sea level", "at what {elevation} is the {type} {name}"),
                  "Old maps disagree about the {elevation} of {subj}."),
        Attribute("landmark", _one_of("cathedral", "lighthouse", "fortress", "museum", "observatory", "gardens",
                                      "fountain", "university", "theatre", "castle", "aqueduct", "opera house"),
                  ("{subj} is {famous} for its {value}.", "Its {value} makes {subj} {famous}."),
                  ("what is {name} {famous} for", "why is the {type} {name} {famous}", "{name} most {famous} sight"),
                  "Guides rarely agree on what makes {subj} {famous}."),
    )),
    EntityType("river", "{qual} {stem}",
               ("Upper", "Lower", "North", "South", "East", "West", "Little", "Grand", "Old", "Middle", "Far", "Near"), (
        Attribute("length", _number(15, 4000, " kilometres"),
                  ("{subj} has a {length} of {value}.", "With a {length} of {value}, {subj} is a major {type}."),
                  ("what is the {length} of {name}", "{name} total {length} in km", "{length} of the {type} {name}"),
                  "The exact {length} of {subj} is hard to measure."),
        Attribute("source", _place(),
                  ("The {source} of {subj} lies near {value}.", "{subj} has its {source} near {value}."),
                  ("where is the {source} of {name}", "{name} {source} location", "the {type} {name} has its {source} where"),
                  "Explorers long searched for the {source} of {subj}."),
        Attribute("mouth", _place(" Sea"),
                  ("{subj} {empties} into the {value}.", "Near its end, {subj} {empties} into the {value}."),
                  ("{name} {empties} into which sea", "into what sea the {type} {name} {empties}", "where {name} {empties} into the sea"),
                  "Sediment builds up where {subj} {empties} into the sea."),
        Attribute("discharge", _number(3, 20_000, " cubic metres per second"),
                  ("{subj} has an average {discharge} of {value}.", "The mean {discharge} of {subj} is {value}."),
                  ("average {discharge} of {name}", "what is the {discharge} of the {type} {name}", "{name} {discharge} per second"),
                  "The {discharge} of {subj} varies with the seasons."),
        Attribute("basin", _number(100, 900_000, " square kilometres"),
                  ("{subj} drains a {basin} of {value}.", "The {basin} of {subj} covers {value}."),
                  ("how large is the {basin} of {name}", "{name} {basin} area", "size of the {type} {name} {basin}"),
                  "Farms cover much of the {basin} of {subj}."),
        Attribute("bridges", _number(0, 60),
                  ("{value} {bridges} cross {subj}.", "{subj} is crossed by {value} {bridges}."),
                  ("how many {bridges} cross {name}", "number of {bridges} over the {type} {name}", "{name} {bridges} count"),
                  "Several of the {bridges} over {subj} are very old."),
    )),
    EntityType("compound", "{stem} {qual}",
               ("oxide", "chloride", "sulfate", "nitrate", "acetate", "bromide", "carbonate", "phosphate", "fluoride",
                "hydride", "iodide", "silicate"), (
        Attribute("discovered", _number(1600, 2015),
                  ("{subj} was first {discovered} in {value}.", "In {value}, {subj} was {discovered} for the first time."),
                  ("when was {name} first {discovered}", "year the {type} {name} was {discovered}", "{name} {discovered} in what year"),
                  "Textbooks differ on who first {discovered} {subj}."),
        Attribute("synthesized", _person,
                  ("{subj} was first {synthesized} by the {chemist} {value}.", "The {chemist} {value} {synthesized} {subj} first."),
                  ("which {chemist} first {synthesized} {name}", "who {synthesized} the {type} {name}", "{name} first {synthesized} by whom"),
                  "Pure {subj} is rarely {synthesized} outside laboratories."),
        Attribute("colour", _one_of("white", "yellow", "green", "blue", "red", "orange", "violet", "black", "grey",
                                    "brown", "pink", "turquoise"),
                  ("{subj} has a {value} {colour}.", "In pure form, {subj} shows a {value} {colour}."),
                  ("what {colour} is {name}", "{colour} of the {type} {name}", "{name} {colour}"),
                  "Impurities can change the {colour} of {subj}."),
        Attribute("melting", _number(-120, 2500, " degrees"),
                  ("{subj} has a {melting} point of {value}.", "The {melting} point of {subj} is {value}."),
                  ("what is the {melting} point of {name}", "{name} {melting} temperature", "{melting} point of the {type} {name}"),
                  "Pressure affects the {melting} point of {subj}."),
        Attribute("use", _one_of("fertilizer", "dye", "solvent", "preservative", "catalyst", "pigment", "disinfectant",
                                 "sweetener", "lubricant", "propellant", "medicine", "coolant"),
                  ("{subj} is mainly {used} as a {value}.", "Industry has {used} {subj} as a {value} for decades."),
                  ("what is {name} {used} for", "{name} is {used} as what", "main purpose the {type} {name} is {used} for"),
                  "{subj} is rarely {used} in households."),
        Attribute("toxicity", _one_of("mildly", "highly", "slightly", "moderately", "extremely", "barely"),
                  ("{subj} is {value} {toxic}.", "Tests show that {subj} is {value} {toxic}."),
                  ("how {toxic} is {name}", "is the {type} {name} {toxic}", "{name} {toxic} level"),
                  "Whether {subj} is {toxic} to plants is still studied."),
    )),
    EntityType("species", "{qual} {stem}",
               ("Greater", "Lesser", "Spotted", "Crested", "Striped", "Pygmy", "Giant", "Dwarf", "Horned", "Banded",
                "Hooded", "Tufted"), (
        Attribute("habitat", _one_of("forests", "wetlands", "grasslands", "deserts", "mountains", "reefs", "caves",
                                     "tundra", "swamps", "savannas", "coasts", "lakes"),
                  ("The natural {habitat} of {subj} is {value}.", "{subj} has its {habitat} in {value}."),
                  ("what is the {habitat} of {name}", "where is the natural {habitat} of the {type} {name}", "{name} {habitat}"),
                  "Loss of {habitat} threatens {subj}."),
        Attribute("diet", _one_of("insects", "seeds", "fruit", "fish", "grass", "leaves", "worms", "nectar", "snails",
                                  "roots", "berries", "plankton"),
                  ("The {diet} of {subj} consists mostly of {value}.", "{subj} lives on a {diet} of {value}."),
                  ("what is the {diet} of {name}", "{name} {diet}", "main {diet} of the {type} {name}"),
                  "The {diet} of {subj} changes with the seasons."),
        Attribute("lifespan", _number(2, 120, " years"),
                  ("{subj} has a {lifespan} of about {value}.", "A typical {lifespan} of {subj} is {value}."),
                  ("what is the {lifespan} of {name}", "{name} {lifespan} in years", "how long is the {lifespan} of the {type} {name}"),
                  "Little data exists on the {lifespan} of {subj} in the wild."),
        Attribute("weight", _number(1, 5000, " kilograms"),
                  ("{subj} reaches a {weight} of {value}.", "Adults of {subj} have a {weight} of {value}."),
                  ("what is the {weight} of {name}", "adult {weight} of the {type} {name}", "{name} {weight} kg"),
                  "Males and females of {subj} differ in {weight}."),
        Attribute("status", _one_of("endangered", "vulnerable", "threatened", "secure", "critical", "stable"),
                  ("The conservation {status} of {subj} is {value}.", "{subj} has a conservation {status} of {value}."),
                  ("conservation {status} of {name}", "what is the {status} of the {type} {name}", "{name} {status}"),
                  "The {status} of {subj} is reviewed every few years."),
        Attribute("described", _number(1700, 2020),
                  ("{subj} was first {described} in {value}.", "In {value}, {subj} was {described} by naturalists."),
                  ("when was {name} first {described}", "year the {type} {name} was {described}", "{name} {described} when"),
                  "{subj} was {described} from a single specimen."),
    )),
    EntityType("company", "{stem} {qual}",
               ("Systems", "Holdings", "Labs", "Group", "Industries", "Partners", "Dynamics", "Works", "Ventures",
                "Logistics", "Foods", "Motors"), (
        FOUNDED,
        Attribute("founder", _person,
                  ("The {founder} of {subj} is {value}.", "{value} is the {founder} of {subj}."),
                  ("who is the {founder} of {name}", "{name} {founder}", "name of the {type} {name} {founder}"),
                  "The family of the {founder} of {subj} still owns shares."),
        Attribute("headquarters", _place(),
                  ("{subj} has its {headquarters} in {value}.", "{subj} keeps its {headquarters} in {value}."),
                  ("where are the {headquarters} of {name}", "{name} {headquarters} location", "in which place is the {type} {name} {headquarters}"),
                  "{subj} plans to move its {headquarters}."),
        Attribute("employees", _number(5, 200_000),
                  ("{subj} has {value} {employees}.", "About {value} {employees} work for {subj}."),
                  ("how many {employees} does {name} have", "{name} number of {employees}", "{employees} at the {type} {name}"),
                  "{subj} is hiring more {employees}."),
        Attribute("products", _one_of("furniture", "textiles", "software", "engines", "toys", "tools", "cables", "paper",
                                      "glass", "batteries", "ceramics", "bicycles"),
                  ("The main {products} of {subj} are {value}.", "{subj} sells {products} such as {value}."),
                  ("what {products} does {name} sell", "{name} main {products}", "which {products} come from the {type} {name}"),
                  "{subj} plans to add new {products}."),
        Attribute("revenue", _number(1, 90_000, " million dollars"),
                  ("{subj} reported a {revenue} of {value}.", "The yearly {revenue} of {subj} is {value}."),
                  ("what is the {revenue} of {name}", "{name} annual {revenue}", "how much {revenue} does the {type} {name} make"),
                  "The {revenue} of {subj} has grown steadily."),
    )),
    EntityType("musician", "{qual} {stem}",
               ("Mira", "Jon", "Ada", "Elio", "Nora", "Tomas", "Lina", "Oskar", "Vera", "Ivo", "Rosa", "Felix"), (
        Attribute("genre", _one_of("jazz", "folk", "techno", "opera", "blues", "punk", "reggae", "soul", "ambient",
                                   "gospel", "bluegrass", "swing"),
                  ("The {genre} of {subj} is {value}.", "{subj} performs in the {value} {genre}."),
                  ("what {genre} does {name} play", "{name} musical {genre}", "{genre} of the {type} {name}"),
                  "Critics argue about the {genre} of {subj}."),
        Attribute("instrument", _one_of("piano", "violin", "guitar", "cello", "drums", "flute", "harp", "trumpet",
                                        "saxophone", "clarinet", "organ", "accordion"),
                  ("{subj} {plays} the {value}.", "On stage, {subj} {plays} the {value}."),
                  ("{name} {plays} which instrument", "instrument the {type} {name} {plays}", "what {name} {plays} on stage"),
                  "{subj} also {plays} other instruments at home."),
        Attribute("debut", _number(1950, 2022),
                  ("{subj} made a {debut} in {value}.", "The {debut} of {subj} came in {value}."),
                  ("when was the {debut} of {name}", "{name} {debut} year", "in what year did the {type} {name} have a {debut}"),
                  "Few people remember the {debut} of {subj}."),
        Attribute("label", _place(" Music"),
                  ("{subj} is signed to the {label} {value}.", "The {label} of {subj} is {value}."),
                  ("which {label} is {name} signed to", "{name} record {label}", "{label} of the {type} {name}"),
                  "{subj} has considered leaving the {label}."),
        Attribute("hometown", _place(),
                  ("The {hometown} of {subj} is {value}.", "{value} is the {hometown} of {subj}."),
                  ("what is the {hometown} of {name}", "{name} {hometown}", "{hometown} of the {type} {name}"),
                  "{subj} often visits the old {hometown}."),
        Attribute("albums", _number(1, 40),
                  ("{subj} has put out {value} {albums}.", "So far {subj} has {value} {albums}."),
                  ("how many {albums} has {name} put out", "number of {albums} by the {type} {name}", "{name} {albums} count"),
                  "{subj} is working on new {albums}."),
    )),
)
_TYPE_BY_NAME = {t.name: t for t in TYPES}

# Sentences that state nothing. A passage may end with one: a generic filler (varies length) or
# a mention of another of the entity's attributes (a passage that matches the query's words
# without answering it, so lexical matching alone is not enough).
FILLERS = (
    "{subj} is often mentioned in the literature.",
    "Little else is recorded about {subj}.",
    "{subj} has been the subject of several studies.",
    "{subj} is described in many reference works.",
    "{subj} is listed in most standard catalogues.",
)
GENERIC_FILLER_PROBABILITY = 0.25
MENTION_PROBABILITY = 0.25

# ---------------------------------------------------------------------------------------------
# Layout of the world: fixed sizes make pid -> entity -> family pure arithmetic.
# ---------------------------------------------------------------------------------------------
ENTITIES_PER_FAMILY = 4
PASSAGES_PER_ENTITY = 4
ATTRIBUTES_PER_ENTITY = 6
SLOTS = ((0, 2), (2, 4), (4, 5), (5, 6))   # fact positions stated by each of an entity's passages
SLOT_OF_FACT = tuple(slot for slot, (a, b) in enumerate(SLOTS) for _ in range(a, b))
FACTS_IN_FIRST = tuple(b for _, b in SLOTS)  # facts stated by an entity's first k+1 passages
assert all(len(t.attributes) == ATTRIBUTES_PER_ENTITY for t in TYPES)
assert all(len(t.qualifiers) >= ENTITIES_PER_FAMILY for t in TYPES)

# Stems are a bijection of the family index (scrambled by an odd stride), so names never repeat.
_STEM_SPACE = len(_SYLLABLES) ** 3 * len(_CODAS)
_STEM_STRIDE = 1_000_003  # prime, coprime with the stem space
assert math.gcd(_STEM_SPACE, _STEM_STRIDE) == 1
assert _STEM_SPACE * ENTITIES_PER_FAMILY * PASSAGES_PER_ENTITY >= MAX_PASSAGES

# Independent random streams per seed.
_FAMILY, _ENTITY, _QUERY, _STEMS, _TWIN = range(5)


def _rng(seed, stream, index=0):
    return random.Random((seed << 40) | (stream << 32) | index)


@functools.lru_cache(maxsize=8)
def _stem_offset(seed):
    return _rng(seed, _STEMS).randrange(_STEM_SPACE)


def _stem(seed, family):
    x = (family * _STEM_STRIDE + _stem_offset(seed)) % _STEM_SPACE
    x, coda = divmod(x, len(_CODAS))
    syllables = []
    for _ in range(3):
        x, s = divmod(x, len(_SYLLABLES))
        syllables.append(_SYLLABLES[s])
    return ("".join(syllables) + _CODAS[coda]).capitalize()


# ---------------------------------------------------------------------------------------------
# Introspection: which entity a passage is about, to show that BM25's errors are hard negatives.
# ---------------------------------------------------------------------------------------------
class EntityRef(NamedTuple):
    entity_id: int
    type: str
    stem: str   # siblings share type and stem (and entity_id // ENTITIES_PER_FAMILY)
    name: str


def entity_ref(seed, entity_id):
    """Identity of one entity: its family fixes type and stem, its rank in the family the qualifier."""
    family, rank = divmod(entity_id, ENTITIES_PER_FAMILY)
    rng = _rng(seed, _FAMILY, family)
    etype = TYPES[rng.randrange(len(TYPES))]
    qualifier = rng.sample(etype.qualifiers, ENTITIES_PER_FAMILY)[rank]
    stem = _stem(seed, family)
    return EntityRef(entity_id, etype.name, stem, etype.name_format.format(stem=stem, qual=qualifier))


def entity_of_passage(seed, pid):
    """The entity passage `pid` is about (same entity_id: same entity; same type and stem: sibling)."""
    return entity_ref(seed, pid // PASSAGES_PER_ENTITY)


# ---------------------------------------------------------------------------------------------
# Rendering.
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _parts(template):
    """'a {x} b' -> ('a ', 'x', ' b'): literals at even, slot names at odd positions."""
    return tuple(re.split(r"\{(\w+)\}", template))


def _render(template, rng, slots):
    """Fill slots from `slots` (a string, or a tuple to choose from) or else from SYNONYMS."""
    out = list(_parts(template))
    for i in range(1, len(out), 2):
        key = out[i]
        fill = slots[key] if key in slots else SYNONYMS[key]
        out[i] = fill if isinstance(fill, str) else rng.choice(fill)
    return "".join(out)


def _sentence(template, rng, slots):
    text = _render(template, rng, slots)
    return text[0].upper() + text[1:]


def _filler(rng, other_attributes):
    """A closing sentence template, or None: generic, or a mention of a fact stated elsewhere."""
    r = rng.random()
    if r < GENERIC_FILLER_PROBABILITY:
        return rng.choice(FILLERS)
    if r < GENERIC_FILLER_PROBABILITY + MENTION_PROBABILITY:
        return rng.choice(other_attributes).mention
    return None


class _Canonical:
    """Renders fixed wording: every choice is the first option, the canonical one, and draws nothing."""

    @staticmethod
    def choice(options):
        return options[0]


def _pick(options, rng, fixed_wording):
    drawn = rng.choice(options)
    return options[0] if fixed_wording else drawn


def _say(template, canonical, rng, slots, fixed_wording):
    """`template` rendered from `rng`; with fixed wording the same draws are made (so the values and everything
    after are those of the varied corpus) and `canonical` is said instead, in canonical words."""
    text = _sentence(template, rng, slots)
    return _sentence(canonical, _Canonical, slots) if fixed_wording else text


def _passages(rng, ref, attributes, twins=(), twin_rng=None, fixed_wording=False):
    """The entity's passages: the first sentence names the entity, later ones say "the <type>". `twins`:
    (fact position, passage slot) pairs; that passage ends by stating that fact again, with the same value
    (sentences drawn from `twin_rng`, so the rest of the corpus is the same with or without twins).
    `fixed_wording`: every sentence in its first shape and every synonym slot filled by its set's canonical word."""
    type_words = SYNONYMS[ref.type]
    texts, values = [], {}
    for a, b in SLOTS:
        sentences = []
        for position, attribute in enumerate(attributes[a:b], a):
            subj = ref.name if not sentences else "the " + _pick(type_words, rng, fixed_wording)
            values[position] = attribute.value(rng)
            slots = {"subj": subj, "value": values[position], "type": type_words}
            template = rng.choice(attribute.passage)
            sentences.append(_say(template, attribute.passage[0], rng, slots, fixed_wording))
        filler = _filler(rng, attributes[:a] + attributes[b:])
        if filler:
            slots = {"subj": "the " + _pick(type_words, rng, fixed_wording)}
            sentences.append(_say(filler, filler, rng, slots, fixed_wording))
        texts.append(" ".join(sentences))
    for position, slot in twins:
        slots = {"subj": "the " + _pick(type_words, twin_rng, fixed_wording), "value": values[position],
                 "type": type_words}
        template = twin_rng.choice(attributes[position].passage)
        texts[slot] += " " + _say(template, attributes[position].passage[0], twin_rng, slots, fixed_wording)
    return texts


def _twins(rng, share, num_passages, per_fact=1):
    """(fact position, passage slot) pairs: each fact, with probability `share`, restated in `per_fact` others of
    the entity's `num_passages` passages (as many as there are, if fewer)."""
    twins = []
    for position in range(ATTRIBUTES_PER_ENTITY):
        stated = SLOT_OF_FACT[position] < num_passages   # the last entity may be cut short of this fact's passage
        others = [slot for slot in range(num_passages) if slot != SLOT_OF_FACT[position]] if stated else []
        if rng.random() < share and others:
            # one twin by choice(), as before twins_per_fact existed: the same draws, the same corpus
            slots = [rng.choice(others)] if per_fact == 1 else rng.sample(others, min(per_fact, len(others)))
            twins += [(position, slot) for slot in slots]
    return twins


def _answering(position, twins):
    """The slots of the passages that state the entity's fact at `position`: its own passage, then its twins."""
    return [SLOT_OF_FACT[position]] + [slot for p, slot in twins if p == position]


def _query(rng, ref, attribute):
    slots = {"name": ref.name, "type": SYNONYMS[ref.type]}
    return _render(rng.choice(attribute.query), rng, slots).lower()


# ---------------------------------------------------------------------------------------------
# Sizes and query selection.
# ---------------------------------------------------------------------------------------------
def _num_facts(num_passages):
    """Facts stated by the corpus; the last entity may be cut short after its first passages."""
    full, rest = divmod(num_passages, PASSAGES_PER_ENTITY)
    return full * ATTRIBUTES_PER_ENTITY + (FACTS_IN_FIRST[rest - 1] if rest else 0)


def _non_negative_int(what, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ReprolibError(f"synthetic: {what} must be a non-negative integer, got {value!r}")
    return int(value)


def _check_sizes(num_passages, num_train, num_dev):
    if not MIN_PASSAGES <= num_passages <= MAX_PASSAGES:
        raise ReprolibError(f"synthetic: num_passages must be from {MIN_PASSAGES:,} to {MAX_PASSAGES:,}, "
                            f"got {num_passages:,}")
    facts = _num_facts(num_passages)
    if num_train + num_dev > facts:
        raise ReprolibError(f"synthetic: {num_train:,} train + {num_dev:,} dev queries asked, but "
                            f"{num_passages:,} passages state only {facts:,} facts (one query per fact)")


def _sizes(num_passages, num_train_queries, num_dev_queries, seed):
    """The sizes and seed checked, with generate()'s defaults filled in."""
    num_passages = _non_negative_int("num_passages", num_passages)
    if num_train_queries is None:
        num_train_queries = min(num_passages, 500_000)
    if num_dev_queries is None:
        num_dev_queries = min(max(num_passages // 10, 100), 7000)
    num_train_queries = _non_negative_int("num_train_queries", num_train_queries)
    num_dev_queries = _non_negative_int("num_dev_queries", num_dev_queries)
    seed = _non_negative_int("seed", seed)
    _check_sizes(num_passages, num_train_queries, num_dev_queries)
    return num_passages, num_train_queries, num_dev_queries, seed


def _check_twins(unlabelled_twins, twins_per_fact):
    if isinstance(unlabelled_twins, bool) or not isinstance(unlabelled_twins, numbers.Real) \
            or not 0 <= unlabelled_twins <= 1:
        raise ReprolibError(f"synthetic: unlabelled_twins is a share of the facts, from 0 to 1, got {unlabelled_twins!r}")
    if isinstance(twins_per_fact, bool) or not isinstance(twins_per_fact, numbers.Integral) \
            or not 1 <= twins_per_fact < PASSAGES_PER_ENTITY:
        raise ReprolibError(f"synthetic: twins_per_fact is how many other passages of the entity restate a fact, "
                            f"1 to {PASSAGES_PER_ENTITY - 1}, got {twins_per_fact!r}")


def _pick_facts(seed, num_facts, num_train, num_dev):
    """Distinct fact ids for the queries, sorted, with a flag marking the dev ones."""
    rng = np.random.default_rng([seed, _QUERY])
    # shuffle=False keeps memory O(picks) for large corpora; the shuffle after makes the split uniform
    picked = rng.choice(num_facts, size=num_train + num_dev, replace=False, shuffle=False)
    rng.shuffle(picked)
    is_dev = np.zeros(len(picked), dtype=bool)
    is_dev[:num_dev] = True
    order = np.argsort(picked, kind="stable")
    return picked[order].tolist(), is_dev[order].tolist()


# ---------------------------------------------------------------------------------------------
# The generator.
# ---------------------------------------------------------------------------------------------
def generate(out_dir, num_passages=5000, num_train_queries=None, num_dev_queries=None, seed=42, unlabelled_twins=0.0,
             twins_per_fact=1, fixed_wording=False, progress=True):
    """Write the dataset into `out_dir` in MS MARCO layout and return its stats.

    Files: corpus.tsv (pid, title, text), {train,dev}.query.txt (qid, text), qrels.{train,dev}.tsv
    (qid 0 pid 1) and synthetic.json. Each query asks for one fact, so it has exactly one relevant
    passage; train and dev ask about different facts; qids are unique across both splits.
    `unlabelled_twins` (0 to 1): the share of facts restated by `twins_per_fact` (1 to 3) other passages of the
    same entity; a dev query's qrels then list every passage that states its fact, a train query's one of them,
    picked at random.
    `fixed_wording`: passages say each thing one way (their first sentence shape, canonical synonyms); the facts, the
    fillers and the queries are those of the varied corpus, and the queries still paraphrase.
    Defaults: num_train_queries = min(num_passages, 500k), num_dev_queries = 10% in [100, 7000].
    """
    num_passages, num_train_queries, num_dev_queries, seed = _sizes(num_passages, num_train_queries, num_dev_queries,
                                                                    seed)
    _check_twins(unlabelled_twins, twins_per_fact)
    if not isinstance(fixed_wording, bool):
        raise ReprolibError(f"synthetic: fixed_wording is true or false, got {fixed_wording!r}")

    start = time.perf_counter()
    out_dir = Path(out_dir)
    num_entities = -(-num_passages // PASSAGES_PER_ENTITY)
    num_facts = _num_facts(num_passages)
    facts, is_dev = _pick_facts(seed, num_facts, num_train_queries, num_dev_queries)
    with contextlib.ExitStack() as stack:
        corpus = stack.enter_context(atomic_write(out_dir / "corpus.tsv"))
        queries = [stack.enter_context(atomic_write(out_dir / f"{split}.query.txt")) for split in ("train", "dev")]
        qrels = [stack.enter_context(atomic_write(out_dir / f"qrels.{split}.tsv")) for split in ("train", "dev")]
        bar = stack.enter_context(tqdm(total=num_passages, unit="passage", disable=not progress, desc="synthetic"))
        q = 0  # index into facts; also the qid, so qids are unique across splits
        for e in range(num_entities):
            ref = entity_ref(seed, e)
            rng = _rng(seed, _ENTITY, e)
            attributes = rng.sample(_TYPE_BY_NAME[ref.type].attributes, ATTRIBUTES_PER_ENTITY)
            first_pid = e * PASSAGES_PER_ENTITY
            n = min(PASSAGES_PER_ENTITY, num_passages - first_pid)
            twin_rng = _rng(seed, _TWIN, e)
            twins = _twins(twin_rng, unlabelled_twins, n, twins_per_fact) if unlabelled_twins else []
            texts = _passages(rng, ref, attributes, twins, twin_rng, fixed_wording)
            corpus.write("".join(f"{first_pid + i}\t{ref.name}\t{texts[i]}\n" for i in range(n)))
            bar.update(n)

            qrng = _rng(seed, _QUERY, e)  # its own stream: the corpus does not depend on the queries
            while q < len(facts) and facts[q] < (e + 1) * ATTRIBUTES_PER_ENTITY:
                position = facts[q] - e * ATTRIBUTES_PER_ENTITY
                split = int(is_dev[q])
                queries[split].write(f"{q}\t{_query(qrng, ref, attributes[position])}\n")
                answering = _answering(position, twins)
                if not split:   # train: one of the answering passages is labelled, at random, as on MS MARCO
                    answering = [twin_rng.choice(answering)] if len(answering) > 1 else answering
                qrels[split].writelines(f"{q}\t0\t{first_pid + slot}\t1\n" for slot in answering)   # dev: all
                q += 1

    stats = {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "num_passages": num_passages,
        "num_train_queries": num_train_queries,
        "num_dev_queries": num_dev_queries,
        "num_entities": num_entities,
        "num_facts": num_facts,
        "passages_per_entity": PASSAGES_PER_ENTITY,
        "entities_per_family": ENTITIES_PER_FAMILY,
        "types": [t.name for t in TYPES],
        **({"unlabelled_twins": unlabelled_twins} if unlabelled_twins else {}),
        **({"twins_per_fact": twins_per_fact} if unlabelled_twins and twins_per_fact > 1 else {}),
        **({"fixed_wording": True} if fixed_wording else {}),
    }
    with atomic_write(out_dir / "synthetic.json") as f:
        json.dump(stats, f, indent=2)
    seconds = time.perf_counter() - start
    return {**stats, "seconds": round(seconds, 3), "passages_per_second": round(num_passages / seconds)}


def answers(num_passages=5000, num_train_queries=None, num_dev_queries=None, seed=42, unlabelled_twins=0.0,
            twins_per_fact=1):
    """{qid: [pid, ...]}: every passage that states each query's fact, for the train queries as for the dev ones,
    as generate() writes them with the same sizes, seed and twins (its wording does not move them). A train query's
    qrels label one of these; the others are what the labels leave out (bench/oracle_teacher.py teaches them)."""
    num_passages, num_train_queries, num_dev_queries, seed = _sizes(num_passages, num_train_queries, num_dev_queries,
                                                                    seed)
    _check_twins(unlabelled_twins, twins_per_fact)
    facts, _ = _pick_facts(seed, _num_facts(num_passages), num_train_queries, num_dev_queries)
    found, twins_of = {}, {}
    for q, fact in enumerate(facts):   # the qid is the fact's index, as in generate()
        e, position = divmod(fact, ATTRIBUTES_PER_ENTITY)
        first_pid = e * PASSAGES_PER_ENTITY
        if e not in twins_of:   # generate()'s first draws from the entity's twin stream
            n = min(PASSAGES_PER_ENTITY, num_passages - first_pid)
            twins_of[e] = _twins(_rng(seed, _TWIN, e), unlabelled_twins, n, twins_per_fact) if unlabelled_twins else []
        found[str(q)] = [str(first_pid + slot) for slot in _answering(position, twins_of[e])]
    return found
