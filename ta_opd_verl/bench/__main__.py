"""Benchmarks of TA-OPD's math.

Commands:
    python -m ta_opd_verl.bench scoring                 # full size (V = 151,669), several minutes
    python -m ta_opd_verl.bench scoring --n 64 --v 1000 --k 4 --repeats 1   # smoke run, seconds
    python -m ta_opd_verl.bench onpolicy --selector full teachability --seeds 0 1   # tiny pair, minutes
    python -m ta_opd_verl.bench teacher --steps 20      # fsdp vs server teacher through verl, minutes
    python -m ta_opd_verl.bench teacher-memory          # blocked teacher head, losses: V = 151,936, minutes
    python -m ta_opd_verl.bench cpu-share --metrics outputs/demo/metrics.jsonl   # who uses the CPU in a run
"""

import argparse
import sys

from ta_opd_verl.bench import cpu_share, onpolicy, scoring, teacher, teacher_memory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ta_opd_verl.bench", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    scoring.add_arguments(
        commands.add_parser(
            "scoring", help="token_statistics vs verl's top-k processor: time and peak memory"
        )
    )
    onpolicy.add_arguments(
        commands.add_parser(
            "onpolicy", help="on-policy TA-OPD on the tiny pair in plain PyTorch: accuracy vs step"
        )
    )
    teacher.add_arguments(
        commands.add_parser(
            "teacher",
            help="fsdp vs server teacher through verl's trainer on the tiny pair: step time, selection",
        )
    )
    teacher_memory.add_arguments(
        commands.add_parser(
            "teacher-memory",
            help="colocated teacher's scoring and the OPD losses, blocked vs unblocked: time and peak memory",
        )
    )
    cpu_share.add_arguments(
        commands.add_parser(
            "cpu-share", help="CPU share of each process group (Ray actors, vLLM engines) during a run"
        )
    )
    args = parser.parse_args(argv)
    if args.command == "scoring":
        scoring.run(args)
    elif args.command == "onpolicy":
        onpolicy.run(args)
    elif args.command == "teacher":
        teacher.run(args)
    elif args.command == "teacher-memory":
        teacher_memory.run(args)
    elif args.command == "cpu-share":
        cpu_share.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
