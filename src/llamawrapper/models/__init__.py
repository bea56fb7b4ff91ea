"""Models: where they come from (registry), how they are converted, cached, loaded, quantized,
overridden and given LoRA adapters, and the host that loads, swaps and unloads their versions."""
