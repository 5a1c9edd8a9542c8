"""``ta-opd compare``: the selector comparison through verl's trainer on the tiny pair.

- `plan`: the planned runs and each run's verl overrides.
- `runner`: runs the plan (reusing complete runs) through verl's trainer; `heldout`: the held-out reverse KL.
- `results`: each run's stored result, the aggregation over seeds, the table and the output files;
  `plot`: ``compare.png``.
- `main`: the command line.
"""
