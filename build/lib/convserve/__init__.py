"""convserve: train, explain, track and serve CNN image classifiers."""

__version__ = "0.1.0"
