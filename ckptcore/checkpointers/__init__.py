"""Checkpointers: save, restore and metadata in one object, synchronously or in the background."""
