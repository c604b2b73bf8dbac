"""intern2: the general models of INTERN 2.0 in plain PyTorch."""
__version__ = "0.1.0"
