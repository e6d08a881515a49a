"""The paper's experiments as runnable scripts over the four packages (not library code).

Run them from the repository root, e.g. ``python -m experiments.mnist_experiments --help``.
"""
