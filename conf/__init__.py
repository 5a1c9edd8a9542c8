"""TA-OPD's Hydra configs. Installed as the package ``ta_opd_verl.conf`` (pyproject.toml maps this folder
there), so ``--config-path pkg://ta_opd_verl.conf`` finds them from a wheel as from the clone; Hydra's
``pkg://`` search path needs a regular package, hence this file."""
