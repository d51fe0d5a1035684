"""saferedir concept pack: nudity (concept ``nudity``, category ``nsfw``)."""

__version__ = "0.1.0"
