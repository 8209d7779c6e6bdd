"""Experiments over many runs: compare (methods or settings on the same budget), the reward/KL
frontier, and the digits demo."""
