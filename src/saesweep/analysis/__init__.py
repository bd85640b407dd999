"""From cells to answers: the cells table, scaling-law fits, figures and the report's tables."""
