"""Uptraining recipes (torchtune-style scripts + YAML configs) live here."""
