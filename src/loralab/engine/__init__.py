"""Models, data, the training loop, generation and drift: where torch lives."""
