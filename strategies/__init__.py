"""One file per method; each registers itself with `framework.registry.register`."""
