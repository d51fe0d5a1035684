"""The saferedir efficacy benchmark: SafeRedir beside the alternatives (negative prompt, Safe
Latent Diffusion, keyword blocklist, LEACE) on a backbone's prompt sets, judged image by image.
A plugin of its own: it adds ``saferedir eval`` and reaches pipelines only through adapters."""

__version__ = "0.2.0"
