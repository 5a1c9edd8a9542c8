"""``ta-opd demo``: TA-OPD on the tiny pair through verl's trainer (`run`), then its report and plot
(`report`)."""
