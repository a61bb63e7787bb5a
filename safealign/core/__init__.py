"""The core layer: registries, params, atomic I/O, content hashing, errors and runtime. No torch at import."""
