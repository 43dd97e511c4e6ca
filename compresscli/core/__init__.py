"""The bottom layer: errors, registries, progress, the cache folder, the machine's memory and CPU."""
