"""What every stage shares: site names, atomic files, errors, provenance, progress."""
