"""Small-scale replications of the paper's figures (``rankpm experiment objectives|pmp``).

Kept light: the submodules import torch and the engine only when an experiment runs.
"""
