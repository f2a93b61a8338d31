"""Merging methods, one module per family (DESIGN.md, Layout)."""
