"""The ``ta-opd`` command (`main`) and ``ta-opd train`` (`train`: verl's ``main_ppo`` as a supervised
child process, which the demo, the comparison and the benchmarks run through too)."""
