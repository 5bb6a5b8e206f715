"""Shared machinery: engine (devices, seeding, checkpoints), registry, results, stats, report, bench."""
