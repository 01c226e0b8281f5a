"""The training curve's columns, in one place: one value per optimizer step in each (engine.train's
TrainResult.curve and StepInfo.row), what the workspace streams and stores (workspace.store) and what
trackers log (track.hook). No torch here, so the store can import it."""

CURVE_KEYS = ("step", "loss", "grad_norm", "lr", "tokens", "seconds")
