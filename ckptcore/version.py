"""The release number of ckptcore (shared by every distribution of this repository)."""

__version__ = "0.2.0"
