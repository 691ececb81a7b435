"""The serving engine: model states, dynamic batching, validation, statistics."""
