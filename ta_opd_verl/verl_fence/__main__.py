"""``python -m ta_opd_verl.verl_fence``: every fingerprinted verl function with its recorded and its
installed source hash. After a verl upgrade, re-read each changed function against the fence module that
names it before copying its new hash into that module."""

from __future__ import annotations

import sys

from ta_opd_verl.verl_fence import FINGERPRINTS, fingerprinted_modules, source_fingerprint


def main() -> int:
    fingerprinted_modules()
    changed = 0
    for name, recorded in sorted(FINGERPRINTS.items()):
        installed = source_fingerprint(name)
        changed += installed != recorded
        print(f"{'ok     ' if installed == recorded else 'CHANGED'} {installed} {name}")
    print(f"{changed} of {len(FINGERPRINTS)} fingerprints differ from the installed verl")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
