"""Paged KV memory. See README.md in this folder for the layout and the import rules."""
