"""WordNet 3.0 synsets from the Debian package `wordnet-base`, parsed from its database files.

Each synset carries its lemmas, definition, usage examples, part of speech and lexicographer file
(the "supersense", e.g. noun.animal). No nltk needed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .paths import find_source

# lexnames(5WN): lexicographer file number -> name. Not shipped by the Debian package.
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
    "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition",
    "verb.communication", "verb.competition", "verb.consumption", "verb.contact", "verb.creation",
    "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social", "verb.stative",
    "verb.weather", "adj.ppl",
)
# Noun and verb supersenses minus the two tiny, ill-defined noun files (Tops, motive): 24 + 15 = 39.
SUPERSENSES_39 = tuple(n for n in LEXNAMES if n.split(".")[0] in ("noun", "verb")
                       and n not in ("noun.Tops", "noun.motive"))
_POS_FILES = {"n": "data.noun", "v": "data.verb", "a": "data.adj", "r": "data.adv"}
_EXAMPLE = re.compile(r'"([^"]+)"')


@dataclass(frozen=True)
class Synset:
    offset: int
    pos: str  # n, v, a, s (satellite adjective) or r
    lexname: str
    lemmas: tuple[str, ...]
    definition: str
    examples: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{self.offset:08d}-{self.pos}"


def parse_data_line(line: str) -> Synset | None:
    """One line of a WordNet data.* file; None for the licence header."""
    if line.startswith("  ") or not line.strip():
        return None
    head, _, gloss = line.partition(" | ")
    f = head.split()
    offset, lex, pos, w_cnt = int(f[0]), int(f[1]), f[2], int(f[3], 16)
    lemmas = tuple(f[4 + 2 * i].replace("_", " ") for i in range(w_cnt))
    gloss = gloss.strip()
    examples = tuple(e.strip() for e in _EXAMPLE.findall(gloss))
    first_quote = gloss.find('"')
    definition = (gloss if first_quote < 0 else gloss[:first_quote]).strip().rstrip(";").strip()
    return Synset(offset, pos, LEXNAMES[lex], lemmas, definition, examples)


@lru_cache(maxsize=4)
def _load(root: str, pos: tuple[str, ...]) -> tuple[Synset, ...]:
    out = []
    for p in pos:
        with open(Path(root) / _POS_FILES[p], encoding="utf-8", errors="replace") as fh:
            for line in fh:
                s = parse_data_line(line)
                if s is not None:
                    out.append(s)
    return tuple(out)


def load_wordnet(pos: tuple[str, ...] = ("n", "v"), path: str | Path | None = None) -> tuple[Synset, ...]:
    """All synsets of the given parts of speech ('n', 'v', 'a', 'r'), in file order."""
    bad = [p for p in pos if p not in _POS_FILES]
    if bad:
        raise ValueError(f"unknown part of speech {bad}; use n, v, a or r")
    root = find_source("wordnet", path, ["/usr/share/wordnet"], [_POS_FILES[p] for p in pos],
                       "install it with `apt-get install wordnet-base` (or run ./run demo as root)")
    return _load(str(root), tuple(pos))
