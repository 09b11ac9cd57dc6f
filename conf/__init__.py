"""Hydra config groups, shipped as package data so installed console scripts find them."""
