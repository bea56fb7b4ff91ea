"""LlamaWrapper's benchmark: this engine against plain transformers (one ``generate`` per request,
and a padded batch) and llama.cpp, side by side in one run. ``python -m bench --help``."""
