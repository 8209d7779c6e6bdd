"""The training loop every method shares (trainer.py), one module per phase: set-up and resume
(start), sampling fresh trajectories (fresh), accumulating gradients (gradients), applying the
update (update), pictures and evaluation while it trains (watching), checkpoints and the final
weights (saving), with what they hand on (state); what it feeds group-based methods
(grouped_cells), and the dry run that sizes it without training (dry_run)."""
