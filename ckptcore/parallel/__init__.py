"""Many processes working on one checkpoint: the coordinators, single-replica restore, preemption."""
