"""Numbers from outputs: pure metric functions, intervals and verdicts, training stability, and
the one table of what each metric is."""
