"""Reading and writing one checkpoint: leaf plans, checksums, the index, the save and restore walks."""
