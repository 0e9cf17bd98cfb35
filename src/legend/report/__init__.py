"""Comparisons and their report, built from what finished runs wrote (legend.records reads the files)."""
