"""Real-shape stand-ins for the paper's models, built offline so every recipe in ``recipes/`` can run on
CPU with the token ids, chat templates and vocabulary sizes its real models use.

`tokenizers` writes the exact tokenizer folders (Qwen3, Qwen2.5-Instruct, DeepSeek-R1-Distill-Qwen).
This package will also hold the real-shape models built on them: the same architectures and embedding
sizes, only narrower and shallower.

Importing this package is cheap; each submodule loads what it needs.
"""
