#!/usr/bin/env python3
"""Builds tiny random models in the exact upstream key layout, runs the PyTorch
reference on them, and writes inputs and expected outputs under tests/fixtures/.

Usage: make_fixtures.py [--out tests/fixtures] [SET ...]   (default: every set)

Each set lives in a module `fixtures_<name>.py` with `build(out_dir)`; it writes
only below `out_dir / <name>` and must be deterministic (fixed seeds, CPU, f32
unless a test says otherwise) so that re-running it changes no committed byte
that matters.
"""
import argparse
import importlib
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent

# name -> module; a module is imported only when its set is built, so a set's
# heavy imports (diffusers, transformers) do not slow the others down.
SETS = {
    "prompt": "fixtures_prompt",
    "vision": "fixtures_vision",
    "loader": "fixtures_loader",
    "decoder": "fixtures_decoder",
    "llm": "fixtures_llm",
    "llm431": "fixtures_llm431",
    "pipeline": "fixtures_pipeline",
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=pathlib.Path, default=ROOT / "tests" / "fixtures")
    ap.add_argument("sets", nargs="*", help=f"sets to build (default: all of {sorted(SETS)})")
    args = ap.parse_args()
    wanted = args.sets or sorted(SETS)
    unknown = [s for s in wanted if s not in SETS]
    if unknown:
        ap.error(f"unknown set(s) {unknown}; known: {sorted(SETS)}")
    sys.path.insert(0, str(HERE))
    for name in wanted:
        out = args.out / name
        out.mkdir(parents=True, exist_ok=True)
        print(f"[fixtures] {name} -> {out}", flush=True)
        importlib.import_module(SETS[name]).build(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
