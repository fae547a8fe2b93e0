"""The gallery of real problems: one module each, ``build(**options) -> adjopt.Problem``.

Installed with adjopt (``pip install -e .``), so ``from problems import poisson_inversion``
works from any working directory; ``adjopt list`` shows the problems and their options.
"""
