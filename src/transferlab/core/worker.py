"""One worker of `transferlab run --jobs N`: `python -m transferlab.core.worker '<json spec>'`.

An internal entry point, not a user command: the spec names the experiment, profile, seeds,
overrides, results folder, device and the claims folder shared by the workers (see `core.jobs`).
"""

from __future__ import annotations

import json
import sys

from .errors import UserError


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    from .engine import Engine
    from .runner import run_experiment

    try:
        engine = Engine(device=spec["device"], mixed_precision=spec["mixed_precision"])
        run_experiment(spec["name"], profile=spec["profile"], seeds=spec["seeds"], overrides=spec["overrides"],
                       out=spec["out"], engine=engine, report=False, claim_dir=spec["claims"])
    except UserError as e:
        print(f"transferlab: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
