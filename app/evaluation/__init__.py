"""Scoring segmentations as the challenge does (DSC, NSD), with a per-modality report.

Needs the ``eval`` extra (scipy); nothing here is imported by ``predict``."""
