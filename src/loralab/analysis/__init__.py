"""Reading stored runs: the comparison, ablation designs and effects, and the findings' rules."""
