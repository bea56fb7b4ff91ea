"""What happens around the engine for one request: plugin hooks, structured output and tool
calls, the response cache, and the per-model customizations that switch them on."""
