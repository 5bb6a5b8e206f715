"""Worked examples that exercise the whole transferlab pipeline on real data."""
