"""Real-shape stand-ins for the paper's models, built offline so every recipe in ``recipes/`` runs on the
CPU with the token ids, chat templates, vocabulary sizes and architectures its real models use.

`tokenizers` writes the exact tokenizer folders (Qwen3, Qwen2.5-Instruct, DeepSeek-R1-Distill-Qwen);
`models` says what each real model's config keeps and how it shrinks; `build` builds and caches the
shrunken models (`ta-opd build-shapes`); `recipe_cpu` runs a recipe on them (`ta-opd recipe-cpu`).

Importing this package is cheap; each submodule loads what it needs.
"""
