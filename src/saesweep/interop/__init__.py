"""Other tools' SAEs: the raw-space form, SAELens and sparsify folders, the export and import stages."""
