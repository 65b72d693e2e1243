"""Evaluation: greedy generation, exact match and multiple-choice scoring under an intervention."""
