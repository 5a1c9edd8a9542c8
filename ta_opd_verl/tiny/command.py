"""`ta-opd build-tiny`: `ta_opd_verl.tiny.build`'s command line, with transformers' progress bars (its
"Writing model shards" bar when a build saves the models) turned off under ``--quiet``, and
``--teacher-own-format``, which builds (or reuses) the pair, then the teacher trained on its own chat format
(`ta_opd_verl.tiny.own_format`).

Both live here, not in build.py, because build.py's source is part of the pair's cache key (an edit there
rebuilds every cached pair), and build.py cannot import own_format, which builds on it.
"""

from __future__ import annotations

import sys

from ta_opd_verl.tiny import build


def main(argv: list[str] | None = None) -> int:
    parser = build.argument_parser()
    parser.add_argument(
        "--teacher-own-format",
        action="store_true",
        help="then build (or reuse) the teacher trained on its own R1-style chat format, in "
        "<out>/teacher-own-format (docs/tiny-pair.md); --force rebuilds that teacher only",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.quiet:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    if args.teacher_own_format:
        from ta_opd_verl.tiny.own_format import build_teacher_own_format

        return build.run(args, build_teacher_own_format)
    return build.run(args)


if __name__ == "__main__":
    sys.exit(main())
