"""The tiny CPU teacher/student pair: task mixture (`tasks`), shared tokenizer (`tokenizer`), builder and
cache (`build`, CLI `ta-opd build-tiny`), greedy evaluation (`evaluate`), the verl parquet files
(`parquet`) and reward (`reward`), and the teachability spread measurement (`measure`).

Importing this package is cheap; torch and transformers load in the submodules that need them.
"""
