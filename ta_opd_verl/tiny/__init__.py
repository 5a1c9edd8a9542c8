"""The tiny CPU teacher/student pair: task mixture (`tasks`), shared tokenizer (`tokenizer`), builder and
cache (`build`, CLI `ta-opd build-tiny`), greedy evaluation (`evaluate`), the verl parquet files
(`parquet`) and reward (`reward`), the teachability spread measurement (`measure`), and a teacher trained
on its own R1-style chat format (`own_format`, `ta-opd build-tiny --teacher-own-format`).

Importing this package is cheap; torch and transformers load in the submodules that need them.
"""
