"""The coordinating side: CLI, Flower ServerApp, aggregation, evaluation and reports."""
