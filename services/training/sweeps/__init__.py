"""Sweeps: one job trains a grid of configurations from one pass over its inputs per epoch.

- the grid itself, the `sweep` field of a job spec and its configurations, is part of the spec (services/spec/sweep.py:
  torch-free, the API validates with it);
- `stacked.py`: side-network configurations of one architecture trained as one set of stacked tensors (vmap);
- `optim.py`: SGD and AdamW over such stacked tensors, with a learning rate and weight decay per configuration.

The training loop itself (services/training/fit.py) feeds each mini-batch to every configuration, so the cache is
read once per epoch for the whole grid, and selects the best configuration on validation.
"""
