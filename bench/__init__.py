"""Benchmarks of keyjobs: ``python -m bench`` runs the suite, ``python -m bench.<name>`` one of them."""
