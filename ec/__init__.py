"""Erasure coding of values across targets (see the erasure-coding issue)."""
