"""The LLM benchmark: triserve's engine against FastAPI and seed-style baselines."""
