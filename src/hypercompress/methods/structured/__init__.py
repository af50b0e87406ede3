"""Structured pruning: blocks, MLP channels and attention head groups (importance, surgery, method)."""
