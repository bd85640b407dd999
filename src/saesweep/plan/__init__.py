"""What a run will do: the validated config, its cells, and each job's resolved settings."""
