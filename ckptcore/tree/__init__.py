"""Pytrees as ckptcore stores them: containers and leaves, key paths and their storage keys, dtypes."""
