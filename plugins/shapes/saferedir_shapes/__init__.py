"""The Shapes world for saferedir-sdk: a tiny trained text-to-image backbone and its measuring
instruments (judge, efficacy suite), registered as a saferedir plugin."""

__version__ = "0.2.0"
