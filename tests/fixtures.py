"""Shared test fixtures (tiny models, synthetic data), loaded by tests/conftest.py."""

from __future__ import annotations
