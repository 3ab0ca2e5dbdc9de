"""The seed CNN and the training machinery around it: config, distributed setup,
precision, optimizer, evaluation, checkpoints, tracking, throughput accounting."""
