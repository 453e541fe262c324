"""``glm-prepare-demo``: fetch and tokenize the bilingual demo corpus."""

from __future__ import annotations

import argparse
import json


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run :func:`data_tools.demo_corpus.prepare_demo`, print stats."""
    parser = argparse.ArgumentParser(prog="glm-prepare-demo", description=__doc__)
    parser.add_argument("--out-dir", default="data/demo", help="output folder (default: data/demo)")
    parser.add_argument("--force", action="store_true", help="rebuild every step, reusing the download cache")
    args = parser.parse_args(argv)

    # Imported here so `--help` stays instant.
    from data_tools.demo_corpus import prepare_demo

    stats = prepare_demo(out_dir=args.out_dir, force=args.force)
    print(json.dumps(stats, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
