"""`ta-opd build-tiny`: `ta_opd_verl.tiny.build.main`, with transformers' progress bars (its "Writing model
shards" bar when a build saves the models) turned off under ``--quiet``.

The switch lives here, not in build.py, because build.py's source is part of the pair's cache key: an edit
there rebuilds every cached pair.
"""

from __future__ import annotations

import sys

from ta_opd_verl.tiny import build


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--quiet" in argv:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    return build.main(argv)


if __name__ == "__main__":
    sys.exit(main())
