"""saferedir concept pack: weapons (concept ``weapons``, category ``object``)."""

__version__ = "0.1.0"
