"""The training loop every method shares, what it feeds group-based methods, and the dry run
that sizes it without training."""
