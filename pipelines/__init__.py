"""Ray Data / Ray Train training, evaluation, simulation and experiment reports.

All ``ray.*`` calls of the library live here and in the serving deployment.
Filled in from Foundation B onward.
"""
