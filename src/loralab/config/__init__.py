"""The experiment file: its schema, loading it with every problem collected, a sweep's search space.
No torch and no Optuna."""
