"""Judging a run: evaluation of a finished run, held-out prompts, evaluation during training,
the x̂0 and Gaussian-floor measurements, rendering and the run's report page."""
