"""Evaluating one trained cell on held-out tokens: metric definitions, token tasks, explanations."""
