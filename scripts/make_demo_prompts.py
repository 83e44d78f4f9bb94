"""Write the prompt set ``gkd demo`` ships: ``gkd/demo/prompts.parquet``, short instructions and questions
built from templates x topics (deterministic; no download), with a ``split`` column (train / heldout).

    python scripts/make_demo_prompts.py            # rewrites gkd/demo/prompts.parquet
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

TEMPLATES = [
    "What is {t}?",
    "Explain {t} in one sentence.",
    "Give me one interesting fact about {t}.",
    "Write a short sentence about {t}.",
    "Why do people care about {t}?",
    "Describe {t} to a child.",
    "List three words related to {t}.",
    "What is a common question about {t}?",
    "Write a two-line poem about {t}.",
    "Is {t} useful? Answer briefly.",
    "How would you describe {t} to a friend?",
    "Tell me something surprising about {t}.",
]

TOPICS = [
    "the moon",
    "rain",
    "music",
    "bread",
    "trees",
    "rivers",
    "a school",
    "money",
    "friendship",
    "winter",
    "the ocean",
    "books",
    "bicycles",
    "coffee",
    "the sun",
    "cats",
    "dogs",
    "a computer",
    "mountains",
    "the internet",
    "gardening",
    "chess",
    "volcanoes",
    "honey bees",
    "electricity",
]

HELDOUT_FRACTION = 0.1


def prompts(seed: int = 0) -> list[tuple[str, str]]:
    """``(prompt, split)`` pairs: every template x topic, shuffled, the first 10% held out."""
    rows = [tpl.format(t=topic) for tpl in TEMPLATES for topic in TOPICS]
    random.Random(seed).shuffle(rows)
    n_held = round(len(rows) * HELDOUT_FRACTION)
    return [(p, "heldout" if i < n_held else "train") for i, p in enumerate(rows)]


def write(path: str | Path, seed: int = 0) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = prompts(seed)
    table = pa.table({"prompt": [p for p, _ in rows], "split": [s for _, s in rows]})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def main() -> None:
    default = Path(__file__).resolve().parents[1] / "gkd" / "demo" / "prompts.parquet"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(default))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    path = write(args.out, args.seed)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
