"""vramtop: a live terminal dashboard of a training job's memory."""

__version__ = "0.1.0"
