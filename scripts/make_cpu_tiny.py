"""Create the files ``configs/cpu_tiny.yaml`` expects: a tiny random Llama student, a different (wider,
deeper, peakier) tiny teacher, both with one byte-level BPE tokenizer trained here, and a prompt file.
Nothing is downloaded. The builders live in ``gkd.demo.tiny`` (``gkd demo --tiny`` uses them too).

    python scripts/make_cpu_tiny.py            # -> runs/tiny/{student,teacher,prompts.parquet}
    gkd train --config configs/cpu_tiny.yaml
"""

from __future__ import annotations

import argparse

from gkd.demo.tiny import TEMPLATE, build, tiny_llama, tokenizer

__all__ = ["TEMPLATE", "build", "tiny_llama", "tokenizer"]

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default="runs/tiny", help="output folder (default runs/tiny)")
    print(build(parser.parse_args().root))
