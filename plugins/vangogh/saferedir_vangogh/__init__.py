"""saferedir concept pack: Van Gogh's painting style (concept ``vangogh``, category ``artist_style``)."""

__version__ = "0.1.0"
