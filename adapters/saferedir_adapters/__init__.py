"""First-party backbone adapters for saferedir-sdk, registered through the ``saferedir`` entry
point group exactly as a third party's would be."""

__version__ = "0.2.0"
