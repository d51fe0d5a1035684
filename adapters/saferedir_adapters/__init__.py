"""First-party backbone adapters for saferedir-sdk, registered through the ``saferedir`` entry
point group exactly as a third party's would be."""
