"""OpenAI-compatible serving of the engine on Ray Serve."""
