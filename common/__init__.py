"""Stdlib-only code that training, export and serving share."""
