"""Trajectories: the one sampler (policy or reference, through the task's step kernel) and the
replay buffer that stores them."""
