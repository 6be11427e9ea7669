"""cnnlab: a config-driven experiment runner for training convolutional networks."""

__version__ = "0.1.0"
