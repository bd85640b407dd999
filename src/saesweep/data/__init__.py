"""From text to activations: the corpus, the language model and its sites, HDF5 shards, shuffled batches."""
