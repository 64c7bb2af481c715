"""The averaging engine: a plan per tensor, streaming float64 arithmetic, the library call."""
