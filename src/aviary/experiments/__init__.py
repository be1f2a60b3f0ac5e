"""The papers' experiments, reproduced on Aviary models (see docs/evaluation.md)."""
