"""What a setting is: the training configuration (TrainConfig) and the parameter dataclasses of
tasks, rewards and methods, validated once."""
