"""Torch and torchrec layers and CTR models (KSA, SIM, CAN, AGE, the composed model).

Never imports ``pipelines``, ``serving`` or ``ray``. Filled in from Foundation B onward.
"""
