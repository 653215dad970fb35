"""A small, generated retrieval world with graded relevance, for the demo.

Invented creatures have five attributes (habitat, diet, size, colour, how they
move). A document describes one creature with *document* phrasings
("lives among hot sand dunes"); a query asks for three attribute values with
different *query* phrasings ("lives in arid wastelands"). A document's grade
for a query is how many of the three it satisfies (0..3).

Why this shape: a pretrained encoder gets part of the way by synonymy, but
conjunctions of constraints, indirect wordings and look-alike templates leave
room that fine-tuning on graded pairs can close. Eval queries ask for attribute
combinations never asked in training, over creatures never seen in training,
so the eval measures generalisation rather than memorisation.

Everything is derived from `seed`; nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import itertools
import random

from bixse_jax.data.sources import GradedPair
from bixse_jax.errors import ConfigError

MAX_GRADE = 3
_NUM_CONSTRAINTS = 3

# attribute -> value -> (document phrasings, query phrasings). Phrases are verb
# phrases ("... that <phrase>"), so templates can join them freely.
_ATTRIBUTES: dict[str, dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "habitat": {
        "desert": (("lives among hot sand dunes", "crosses desert sands",
                    "shelters under desert rocks"),
                   ("lives in arid wastelands", "comes from dry, barren land",
                    "is found where it almost never rains")),
        "ocean": (("lives in the open ocean", "dwells in salt water",
                   "drifts with ocean currents"),
                  ("is marine", "inhabits the high seas",
                   "lives far out at sea")),
        "forest": (("lives in dense forests", "nests in tall woods",
                    "hides in forest undergrowth"),
                   ("inhabits woodland", "lives under a leafy canopy",
                    "dwells in timberland")),
        "mountain": (("lives on high mountain peaks", "clings to steep cliffs",
                      "roams alpine slopes"),
                     ("lives at high altitude", "inhabits the highlands",
                      "is found above the tree line")),
        "swamp": (("lives in murky swamps", "wades through marshes",
                   "hides among bog reeds"),
                  ("inhabits wetlands", "lives on waterlogged ground",
                   "is found in the fens")),
        "arctic": (("lives on the polar ice", "roams frozen tundra",
                    "survives arctic blizzards"),
                   ("lives in freezing regions", "comes from the far north",
                    "inhabits icy lands")),
        "cave": (("lives deep in caves", "roosts in caverns",
                  "hides in grottoes"),
                 ("lives below ground", "dwells where sunlight never reaches",
                  "is subterranean")),
        "grassland": (("lives on open grassland", "roams the wide prairie",
                       "hides in tall savanna grass"),
                      ("inhabits the plains", "lives in open, treeless country",
                       "is found on the steppe")),
    },
    "diet": {
        "meat": (("hunts other animals", "eats raw meat", "preys on small mammals"),
                 ("is carnivorous", "is a predator", "feeds on flesh")),
        "plants": (("eats leaves and grass", "grazes on shrubs", "chews bark and shoots"),
                   ("is herbivorous", "is vegetarian", "feeds only on greenery")),
        "insects": (("eats beetles and ants", "catches flies and moths",
                     "snaps up crickets"),
                    ("is insectivorous", "feeds on bugs", "eats creepy-crawlies")),
        "fish": (("catches fish", "eats salmon and trout", "feeds on minnows"),
                 ("is piscivorous", "eats things with fins and gills",
                  "lives on a seafood diet")),
        "fruit": (("eats ripe berries", "eats figs and plums", "eats fallen apples"),
                  ("is frugivorous", "has a taste for orchard produce",
                   "feeds on sweet produce")),
        "seeds": (("cracks nuts and seeds", "eats grain", "gathers acorns"),
                  ("is granivorous", "feeds on kernels", "lives on pips and grains")),
    },
    "size": {
        "tiny": (("is smaller than a thumb", "weighs a few grams",
                  "could sit on a coin"),
                 ("is minuscule", "is pocket-sized", "is extremely small")),
        "small": (("is cat-sized", "is rabbit-sized",
                   "weighs two kilograms"),
                  ("is smallish", "is compact", "is modestly sized")),
        "large": (("is horse-sized", "stands taller than a man",
                   "weighs several hundred kilograms"),
                  ("is large", "is big-bodied", "is hefty")),
        "huge": (("is bus-length", "weighs many tonnes",
                  "outweighs an elephant"),
                 ("is gigantic", "is enormous", "is colossal")),
    },
    "colour": {
        "red": (("has crimson fur", "has scarlet scales", "has brick-red skin"),
                ("is reddish", "is the colour of ripe tomatoes", "is rust-coloured")),
        "blue": (("has cobalt scales", "has azure feathers", "has sapphire skin"),
                 ("is bluish", "is the colour of a clear sky", "is navy-tinted")),
        "green": (("has emerald scales", "has moss-green fur", "has olive skin"),
                  ("is greenish", "is the colour of fresh leaves", "is lime-tinted")),
        "yellow": (("has golden fur", "has lemon-yellow feathers", "has amber scales"),
                   ("is yellowish", "is the colour of sunflowers", "is canary-coloured")),
        "black": (("has jet-black fur", "has ebony scales", "has coal-dark skin"),
                  ("is blackish", "is the colour of night", "is inky")),
        "white": (("has snow-white fur", "has ivory feathers", "has chalky skin"),
                  ("is whitish", "is the colour of milk", "is pearly")),
        "purple": (("has violet feathers", "has lilac fur", "has plum-coloured scales"),
                   ("is purplish", "is the colour of lavender", "is mauve")),
    },
    "movement": {
        "flies": (("flies on broad wings", "glides between perches",
                   "soars on updrafts"),
                  ("is airborne", "can take to the air", "travels by flight")),
        "swims": (("swims with flippers", "paddles through water",
                   "dives underwater"),
                  ("is a strong swimmer", "moves by swimming", "is at home in water")),
        "burrows": (("digs deep burrows", "tunnels through soil", "digs a den"),
                    ("is a digger", "excavates holes", "is fossorial")),
        "climbs": (("climbs with hooked claws", "scales tree trunks",
                    "clambers up rocks"),
                   ("is a skilled climber", "is arboreal", "goes up vertical surfaces")),
        "runs": (("runs on long legs", "sprints across open ground", "gallops swiftly"),
                 ("is a fast runner", "is swift-footed", "moves at speed on land")),
    },
}
_ATTRIBUTE_NAMES = tuple(_ATTRIBUTES)

_DOC_TEMPLATES = (
    "The {name} {0}, {1}, {2}, {3} and {4}.",
    "{name}: {0}; {1}; {2}; {3}; {4}.",
    "The {name} {0} and {1}. It {2}, {3} and {4}.",
    "A {name} {0}. It {1}, {2}, {3} and {4}.",
)
_QUERY_TEMPLATES = (
    "Which creature {0}, {1} and {2}?",
    "Looking for an animal that {0}, {1} and {2}.",
    "What beast {0} and {1}, and also {2}?",
    "Name a species that {0}, {1}, and {2}.",
    "Find the creature which {0}; it {1} and {2}.",
)

_ONSETS = ("b", "br", "d", "dr", "f", "g", "gl", "k", "kr", "l", "m", "n", "p", "pl",
           "qu", "r", "s", "sk", "t", "th", "v", "z", "zh")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou", "y")
_CODAS = ("", "", "n", "r", "x", "sh", "l", "m", "k")

Profile = dict[str, str]  # attribute -> value
Constraints = tuple[tuple[str, str], ...]  # sorted (attribute, value) pairs


@dataclasses.dataclass
class DemoData:
    """Training pairs plus a held-out, fully judged retrieval eval set."""
    train: list[GradedPair]
    eval_queries: dict[str, str]
    eval_corpus: dict[str, str]
    eval_qrels: dict[str, dict[str, float]]  # Raw grades 0..3, every doc judged.


@dataclasses.dataclass(frozen=True)
class _Entity:
    doc_id: str
    name: str
    profile: Profile
    text: str


def _make_name(rng: random.Random) -> str:
    syllables = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(2))
    return (syllables + rng.choice(_CODAS)).capitalize()


def _make_entities(rng: random.Random, count: int, prefix: str,
                   taken_names: set[str]) -> list[_Entity]:
    entities = []
    for i in range(count):
        name = _make_name(rng)
        while name in taken_names:
            name = _make_name(rng)
        taken_names.add(name)
        profile = {a: rng.choice(sorted(_ATTRIBUTES[a])) for a in _ATTRIBUTE_NAMES}
        order = list(_ATTRIBUTE_NAMES)
        rng.shuffle(order)
        phrases = [rng.choice(_ATTRIBUTES[a][profile[a]][0]) for a in order]
        text = rng.choice(_DOC_TEMPLATES).format(*phrases, name=name)
        entities.append(_Entity(f"{prefix}-doc-{i}", name, profile, text))
    return entities


def _grade(constraints: Constraints, profile: Profile) -> int:
    """Number of the query's constraints the creature satisfies."""
    satisfied = sum(profile[a] == v for a, v in constraints)
    return satisfied * MAX_GRADE // len(constraints)


def _sample_constraints(rng: random.Random, entity: _Entity) -> Constraints:
    attributes = rng.sample(_ATTRIBUTE_NAMES, _NUM_CONSTRAINTS)
    return tuple(sorted((a, entity.profile[a]) for a in attributes))


def _query_text(rng: random.Random, constraints: Constraints) -> str:
    order = list(constraints)
    rng.shuffle(order)
    phrases = [rng.choice(_ATTRIBUTES[a][v][1]) for a, v in order]
    return rng.choice(_QUERY_TEMPLATES).format(*phrases)


def _make_train_pairs(rng: random.Random, entities: list[_Entity], num_queries: int,
                      seen: set[Constraints]) -> list[GradedPair]:
    """Per query: the source creature (grade 3) and one creature of each lower grade.

    Grade-0 pairs are included only half the time: in-batch negatives already
    supply plenty of zeros, but explicit ones keep the targets honest.
    """
    pairs: list[GradedPair] = []
    texts: set[str] = set()
    while len(texts) < num_queries:
        source = rng.choice(entities)
        constraints = _sample_constraints(rng, source)
        text = _query_text(rng, constraints)
        if text in texts:
            continue
        texts.add(text)
        seen.add(constraints)
        query_id = f"train-query-{len(texts) - 1}"
        by_grade: dict[int, list[_Entity]] = {g: [] for g in range(MAX_GRADE + 1)}
        for entity in entities:
            by_grade[_grade(constraints, entity.profile)].append(entity)
        chosen = [(MAX_GRADE, source)]
        chosen += [(g, rng.choice(by_grade[g])) for g in (2, 1) if by_grade[g]]
        if rng.random() < 0.5 and by_grade[0]:
            chosen.append((0, rng.choice(by_grade[0])))
        pairs += [GradedPair(query=text, document=e.text, grade=g / MAX_GRADE,
                             query_id=query_id, doc_id=e.doc_id) for g, e in chosen]
    return pairs


def make_demo_data(
    seed: int = 0,
    num_train_queries: int = 1150,
    num_eval_queries: int = 80,
    *,
    num_train_docs: int = 600,
    num_eval_docs: int = 300,
) -> DemoData:
    """Builds the demo world; identical arguments give identical data.

    Defaults give ~4,000 training pairs (about 125 steps of batch 32) and an
    eval of 80 queries x 300 documents, every pair judged.
    """
    rng = random.Random(seed)
    names: set[str] = set()
    train_entities = _make_entities(rng, num_train_docs, "train", names)
    eval_entities = _make_entities(rng, num_eval_docs, "eval", names)

    seen: set[Constraints] = set()
    train = _make_train_pairs(rng, train_entities, num_train_queries, seen)

    eval_queries: dict[str, str] = {}
    eval_qrels: dict[str, dict[str, float]] = {}
    for attempt in itertools.count():
        if len(eval_queries) == num_eval_queries:
            break
        if attempt > 1000 * num_eval_queries:
            raise ConfigError(f"could not find {num_eval_queries} eval queries whose "
                             "attribute combinations are unseen in training")
        constraints = _sample_constraints(rng, rng.choice(eval_entities))
        if constraints in seen:
            continue
        seen.add(constraints)
        query_id = f"eval-query-{len(eval_queries)}"
        eval_queries[query_id] = _query_text(rng, constraints)
        eval_qrels[query_id] = {e.doc_id: float(_grade(constraints, e.profile))
                                for e in eval_entities}
    return DemoData(train=train, eval_queries=eval_queries,
                    eval_corpus={e.doc_id: e.text for e in eval_entities},
                    eval_qrels=eval_qrels)
