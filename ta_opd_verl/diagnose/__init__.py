"""The paper's fixed-context diagnostic (`ta-opd diagnose`): which score predicts where OPD helps?

- `bank`: sample, save and load the frozen bank of student rollouts.
- `scoring`: per-position KLs, entropies, D, C, Ĉ and the selectors' scores (torch only).
- `models` / `passes`: checked model loading and the forwards over the bank.
- `train`: the masked-training intervention (plain PyTorch on the bank, the plugin's loss code).
- `analysis`: weighted statistics and the prompt-clustered bootstrap (torch only).
- `diagnostic`: the tables; `report`: report.md, summary.json, tokens.parquet, plots; `main`: the CLI.
"""
