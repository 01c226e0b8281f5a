"""From a checked file to stored results: preparing, one run, an experiment, and the executors
that run jobs (execute.jobs holds the protocol)."""
