"""Offline (re)training: Severstal-format data, 5-fold U-Nets, evaluation, and export."""
