"""Composing several LoRA concepts in one image: CLoRA (ALGORITHMS.md §2) and the baselines it is compared with."""
