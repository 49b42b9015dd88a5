"""Evaluate every new ML checkpoint offline, on RQ workers, while training goes on."""

__version__ = "0.1.0"
