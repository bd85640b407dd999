"""What every stage shares: the config and its checks, each job's settings, atomic files, errors, provenance, progress."""
