"""The steps of a training run: CheckpointManager, its options, retention, evaluators."""
