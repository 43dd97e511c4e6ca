"""Reading and writing: safetensors files, checkpoint sources (headers only), the native compressed format both
ways, whole-model loading, data sets, the bundled references, and what inspect reads from headers."""
