"""Reproducible benchmarks of TA-OPD's math; run `python -m ta_opd_verl.bench --help`.

Results and the commands that produced them are recorded in `docs/benchmarks.md`.
"""
