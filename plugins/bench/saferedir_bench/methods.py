"""The methods the benchmark compares (declared once)."""

METHODS = ("none", "negative_prompt", "sld_medium", "sld_max", "blocklist", "leace", "saferedir")
