"""A run: where its settings come from, its folder on disk, its model card and its upload."""
