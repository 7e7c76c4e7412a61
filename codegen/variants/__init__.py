"""One module per variant's kernels; each registers its ``KernelVariant`` (``codegen.registry``) on import."""
