"""Teachability-Aware On-Policy Distillation (TA-OPD) for verl.

The package splits into pure math (`teachability`, torch only), configuration (`config`) and verl glue
(`verl_plugin`, `cpu/`, trainer and loss modules). Importing the package itself imports neither verl nor
vLLM, so the math stays usable on its own.
"""

__version__ = "0.1.0"
