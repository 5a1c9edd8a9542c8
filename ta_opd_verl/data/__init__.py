"""Real training data for the recipes: ``ta-opd prepare-data`` (`prepare`) writes DAPO-Math-17k and GSM8K
as verl parquet files, checked with verl's own scorers."""
