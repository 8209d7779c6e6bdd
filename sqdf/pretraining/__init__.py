"""Rebuilding the shipped digits models: the DDPM base model and its consistency-distilled
student."""
