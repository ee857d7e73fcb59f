"""Config schemas, CNN builder, registries, data, training loop, diagnostics, tracking."""
