"""Optuna sweeps: the study and its ask -> execute -> tell loop, pruning, the dry run."""
