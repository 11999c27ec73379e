"""OpenAI-compatible serving of the engine on Ray Serve; read the files in this order:

- `config.py`: ServeConfig (the application's settings, EngineConfig nested) and IndexUpdate (its user_config).
- `protocol.py`: the OpenAI wire format: request models and validation, APIError, response and stream bodies.
- `replica.py`: one replica's engine: the generator on its engine loop (continuous batching, cancellation),
  prompt checks, index reloads, health.
- `streaming.py`: a streamed request's server-sent events.
- `metrics.py`: the Prometheus metrics.
- `app.py`: the FastAPI ingress, the @serve.deployment, `build_app` and the committed YAML config.
"""
