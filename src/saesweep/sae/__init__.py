"""The sparse autoencoders: the interface every architecture implements, the registry, one module per architecture, and their files."""
