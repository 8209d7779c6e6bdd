"""The plumbing every stage stands on: files written whole, checkpoints, where weights come from,
several processes, stopping on a signal, experiment trackers, pictures and HTML pages."""
