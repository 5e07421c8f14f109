"""Clicks: the CVPR 2025 challenge's simulated user (:mod:`.clicks`) and the click prompts of a case.

The click rule needs scipy (the ``eval`` extra) and imports it only when called; nothing here is
imported by a box-only ``predict``."""
