"""The redirector's capacity choices, declared once (torch-free, so the command line can show the
defaults without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass, fields

CLASSIFIER_READS = ("latent+prompt", "latent")
CLASSIFIER_ENCODERS = ("shared", "own")
#: what a fit may train (``saferedir train --trainable``): every module, the redirection heads alone
#: (the modules the unsafe logit does not read), or the classifier alone (the modules only the logit
#: reads); here, beside the capacity's choices, so the command line reads it without torch
TRAINABLE = ("all", "redirection", "classifier")


@dataclass(frozen=True)
class Capacity:
    """The redirector's capacity choices: the one place their defaults are declared (the trainer
    and ``saferedir train`` take theirs from here). The shipped Shapes bundles use these values."""

    hidden_dim: int = 128
    rank: int = 64  # rank of the low-rank token delta head
    num_heads: int = 4
    latent_pool: int = 16  # the latent is average-pooled to latent_pool x latent_pool first
    latent_layers: int = 2  # convolutions of the latent encoder (each after the second halves the size)
    # how the latent encoder's feature map becomes one vector: "mean" (global average) or "mean+max"
    # (average and maximum concatenated: a shape's tips or a texture's edges anywhere in the image)
    latent_readout: str = "mean"
    token_layers: int = 1  # self-attention layers over the prompt's tokens, and the copy head (0: neither)
    # what the classifier (p(unsafe)) reads: "latent+prompt" (the latent, the timestep and the prompt)
    # or "latent" (the latent and the timestep only: its decision follows the image being formed and
    # no wording can move it; the prompt still drives where the redirection moves the tokens)
    classifier_reads: str = "latent+prompt"
    # the latent encoder and timestep embedding the classifier reads: "shared" with the redirection
    # heads, or its "own" (with classifier_reads "latent" only): then the classifier can be fitted
    # without moving a redirection, and the heads without moving a decision
    classifier_encoder: str = "shared"
    # how many classifiers (with classifier_encoder "own" only) decide together: p(unsafe) is the mean
    # of their probabilities. Members are fitted one at a time and joined by ``saferedir bundle
    # ensemble`` (a fit never trains more than one)
    classifier_members: int = 1

    def __post_init__(self) -> None:
        if self.latent_readout not in ("mean", "mean+max"):
            raise ValueError(
                f"Capacity.latent_readout: expected 'mean' or 'mean+max', got {self.latent_readout!r}"
            )
        if self.classifier_reads not in CLASSIFIER_READS:
            raise ValueError(
                f"Capacity.classifier_reads: expected one of {CLASSIFIER_READS}, got {self.classifier_reads!r}"
            )
        if self.classifier_encoder not in CLASSIFIER_ENCODERS:
            raise ValueError(
                f"Capacity.classifier_encoder: expected one of {CLASSIFIER_ENCODERS}, "
                f"got {self.classifier_encoder!r}"
            )
        if self.classifier_encoder == "own" and self.classifier_reads != "latent":
            raise ValueError(
                "Capacity.classifier_encoder: 'own' needs classifier_reads 'latent' (a classifier that "
                f"reads the prompt reads the shared features), got {self.classifier_reads!r}"
            )
        for f in fields(self):
            if f.name in ("latent_readout", "classifier_reads", "classifier_encoder"):
                continue
            value = getattr(self, f.name)
            least = {"token_layers": 0, "latent_layers": 2}.get(f.name, 1)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"Capacity.{f.name}: expected an int >= {least}, got {value!r}")
        if self.classifier_members != 1 and self.classifier_encoder != "own":
            raise ValueError(
                "Capacity.classifier_members: several members need classifier_encoder 'own' (each member "
                f"is a latent encoder and classifier of its own), got {self.classifier_encoder!r}"
            )
        if self.hidden_dim % self.num_heads:
            raise ValueError(
                f"Capacity.hidden_dim ({self.hidden_dim}) must be divisible by num_heads ({self.num_heads})"
            )
