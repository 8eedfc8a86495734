"""Code both sides of a DermFed federation use: config, data, model, privacy, serialization.

Nothing here imports from `server/` or `client/`, and nothing here imports Flower.
"""
