"""Benchmarks of TA-OPD's math.

Commands:
    python -m ta_opd_verl.bench scoring                 # full size (V = 151,669), several minutes
    python -m ta_opd_verl.bench scoring --n 64 --v 1000 --k 4 --repeats 1   # smoke run, seconds
"""

import argparse
import sys

from ta_opd_verl.bench import scoring


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ta_opd_verl.bench", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    scoring.add_arguments(
        commands.add_parser(
            "scoring", help="token_statistics vs verl's top-k processor: time and peak memory"
        )
    )
    args = parser.parse_args(argv)
    if args.command == "scoring":
        scoring.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
