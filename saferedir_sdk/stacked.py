"""K redirectors of one architecture as one batched computation.

A guard enforcing K concepts ran K redirector forwards per checked step, each some 50 modules
(about 560 small aten ops): on a GPU that is bound by kernel launches and grows with the policy.
:class:`StackedRedirectors` stacks the K redirectors' weights (leading dim K) and runs the same
arithmetic as :meth:`Redirector.forward <saferedir_sdk.redirector.Redirector.forward>` once for
all K: the shared input work (latent pooling, the timestep embedding, the token layer norms'
statistics) is done once, the convolutions become one convolution (the first: the K kernels'
output channels side by side over the shared input) or one grouped convolution (``groups=K``),
linear layers become batched matmuls, attention one fused call over K*B. The number of kernels
per step does not depend on K (``benchmarks/overhead.py`` counts them).

Results match running each redirector alone within float32 rounding (different kernels sum in a
different order; ``tests/test_stacked.py`` bounds the difference at 1e-5 absolute on the logit,
directions, masks and scales of every capacity variant); the decisions and deltas the engine makes
from them therefore agree except for a score within ~1e-6 of a threshold.

The stacked weights are a copy of the redirectors' parameters taken when the engine is built
(``load_bundle`` hands out fresh modules, so nothing edits them afterwards), kept in the
redirectors' dtype (float32: the redirector math runs in float32 whatever the pipeline's dtype)
and moved to the latents' device on first use there (:meth:`on`), so a ``pipe.to("cuda")`` or
CPU offload after ``guard.wrap`` is followed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch.autograd.profiler import record_function
from torch.nn import functional as F

from .conditioning import Conditioning
from .redirector import (
    Redirector,
    RedirectorConfig,
    RedirectorOutput,
    mean_probability_logit,
    member_prefixes,
    timestep_embedding,
)


class StackedRedirectors:
    """The redirectors of K concepts that share one :class:`RedirectorConfig`, as one module.

    ``forward`` returns a :class:`RedirectorOutput` whose tensors carry a leading K dimension:
    logit (K, B), directions (K, B, T_s, D_s) per stream, masks (K, B, T_s), alpha (K, B),
    pooled direction (K, B, P) and pooled mask (K, B).
    """

    def __init__(self, redirectors: Sequence[Redirector]):
        if not redirectors:
            raise ValueError("StackedRedirectors: expected at least one redirector")
        configs = {r.config for r in redirectors}
        if len(configs) != 1:
            raise ValueError(
                f"StackedRedirectors: redirectors of one stack must share a config, got {configs}"
            )
        self.config: RedirectorConfig = redirectors[0].config
        self.size = len(redirectors)
        self._check_inputs = redirectors[0].check_inputs
        # what the classifier reads of the fused features (the redirector's own rule, not restated)
        self._classifier_width = redirectors[0].classifier_parts * self.config.capacity.hidden_dim
        states = [r.state_dict() for r in redirectors]
        with torch.no_grad():
            self.weights = {name: torch.stack([s[name] for s in states]).detach() for name in states[0]}
        self._copies: dict[torch.device, dict[str, torch.Tensor]] = {}

    @property
    def device(self) -> torch.device:
        return next(iter(self.weights.values())).device

    @property
    def dtype(self) -> torch.dtype:
        return self.weights["latent_proj.weight"].dtype

    def nbytes(self) -> int:
        """Bytes of the stacked weights (one copy)."""
        return sum(t.numel() * t.element_size() for t in self.weights.values())

    def on(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The weights on ``device`` (copied there once, then reused): a host-side check only."""
        if device == self.device:
            return self.weights
        if device not in self._copies:  # non_blocking: no host synchronisation on the first step there
            self._copies[device] = {n: t.to(device, non_blocking=True) for n, t in self.weights.items()}
        return self._copies[device]

    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> RedirectorOutput:
        return self.forward(latents, timestep, cond)

    @torch.no_grad()
    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> RedirectorOutput:
        """All K redirectors on the same (B, C, H, W) latents, timestep(s) and conditioning."""
        self._check_inputs(latents, timestep, cond)
        w = self.on(latents.device)
        cfg, cap, k = self.config, self.config.capacity, self.size
        b = latents.shape[0]
        h = cap.hidden_dim
        dtype = self.dtype
        latents = latents.to(dtype)
        embeds = [e.to(dtype) for e in cond.tokens]
        t = timestep.reshape(-1).expand(b) if timestep.ndim else timestep.reshape(1).expand(b)

        def linear_with(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            """K linear layers (weight (K, out, in), bias (K, out)) on x (K, ..., in): one batched matmul."""
            flat = x.reshape(k, -1, x.shape[-1])
            out = torch.baddbmm(bias.unsqueeze(1), flat, weight.transpose(1, 2))
            return out.reshape(*x.shape[:-1], weight.shape[1])

        def linear(name: str, x: torch.Tensor) -> torch.Tensor:
            return linear_with(w[f"{name}.weight"], w[f"{name}.bias"], x)

        def layer_norm(name: str, x: torch.Tensor, *, shared: bool = False) -> torch.Tensor:
            """K layer norms on x (K, ..., D), or on one input every concept shares (``shared``: x
            has no K dim): the statistics once, the per-concept affine broadcast."""
            normed = F.layer_norm(x, x.shape[-1:])
            if shared:
                normed = normed.unsqueeze(0)
            view = (k,) + (1,) * (normed.ndim - 2) + (-1,)
            return normed * w[f"{name}.weight"].view(view) + w[f"{name}.bias"].view(view)

        def mlp(name: str, x: torch.Tensor, layers: Sequence[int]) -> torch.Tensor:
            """A Sequential of linears ``layers`` with SiLU between them."""
            for i, index in enumerate(layers):
                x = linear(f"{name}.{index}", x)
                if i < len(layers) - 1:
                    x = F.silu(x)
            return x

        def attention(name: str, query: torch.Tensor, keys: torch.Tensor | None) -> torch.Tensor:
            """K multi-head attentions (``nn.MultiheadAttention``, batch first): query (K, B, L, h)
            over keys (K, B, S, h); ``keys=None``: self-attention on the query."""
            in_w, in_b = w[f"{name}.in_proj_weight"], w[f"{name}.in_proj_bias"]
            heads, d = cap.num_heads, h // cap.num_heads
            if keys is None:
                q, kk, v = linear_with(in_w, in_b, query).chunk(3, dim=-1)
            else:
                q = linear_with(in_w[:, :h], in_b[:, :h], query)
                kk, v = linear_with(in_w[:, h:], in_b[:, h:], keys).chunk(2, dim=-1)

            def split(x: torch.Tensor) -> torch.Tensor:
                return x.reshape(k * b, x.shape[2], heads, d).transpose(1, 2)

            out = F.scaled_dot_product_attention(split(q), split(kk), split(v))
            out = out.transpose(1, 2).reshape(k, b, query.shape[2], h)
            return linear(f"{name}.out_proj", out)

        # latent encoder: the pooling is shared; the first convolution runs the K kernels side by
        # side over the shared input, the others as one grouped convolution (profiler scopes name
        # the parts: benchmarks/overhead.py reports them)
        pooled_latent = F.adaptive_avg_pool2d(latents, cap.latent_pool)
        t_embedded = timestep_embedding(t.float() * cfg.time_embed_scale, h).to(dtype)
        c_mid = max(32, h // 4)

        def latent_features(prefix: str) -> torch.Tensor:
            """(K, B, h): the ``prefix`` latent encoder and projection of every redirector."""
            x = F.conv2d(
                pooled_latent,
                w[f"{prefix}latent_encoder.0.weight"].flatten(0, 1),
                w[f"{prefix}latent_encoder.0.bias"].flatten(),
                padding=1,
            )
            x = F.group_norm(
                x,
                k * (8 if c_mid % 8 == 0 else 1),
                w[f"{prefix}latent_encoder.1.weight"].flatten(),
                w[f"{prefix}latent_encoder.1.bias"].flatten(),
            )
            x = F.silu(x)
            for index in range(3, 3 + 2 * (cap.latent_layers - 1), 2):
                x = F.conv2d(
                    x,
                    w[f"{prefix}latent_encoder.{index}.weight"].flatten(0, 1),
                    w[f"{prefix}latent_encoder.{index}.bias"].flatten(),
                    stride=2,
                    padding=1,
                    groups=k,
                )
                x = F.silu(x)
            latent_map = x.reshape(b, k, h, -1).transpose(0, 1)  # (K, B, h, h'w')
            z = latent_map.mean(dim=-1)
            if cap.latent_readout == "mean+max":
                z = torch.cat([z, latent_map.amax(dim=-1)], dim=-1)
            return linear(f"{prefix}latent_proj", z)

        def time_features(prefix: str) -> torch.Tensor:
            hidden = F.silu(linear(f"{prefix}time_mlp.0", t_embedded.expand(k, b, h)))
            return linear(f"{prefix}time_mlp.2", hidden)

        with record_function("saferedir.latent_encoder"):
            z = latent_features("")  # (K, B, h)
        with record_function("saferedir.prompt_and_classifier"):
            temb = time_features("")
            tokens = torch.cat(
                [
                    linear(f"token_projs.{i}", layer_norm(f"token_norms.{i}", e, shared=True))
                    + w[f"positions.{i}"].unsqueeze(1)
                    for i, e in enumerate(embeds)
                ],
                dim=2,
            )  # (K, B, sum T_s, h)
            pooled_tokens = tokens.mean(dim=2)
            query = (z + temb).unsqueeze(2)  # (K, B, 1, h)
            attended = attention("cross_attention", query, tokens).squeeze(2)
            features = [z, temb, pooled_tokens, attended]
            if cfg.pooled_dim:
                pooled = cond.pooled.to(dtype)  # type: ignore[union-attr]
                features.append(linear("pooled_proj", layer_norm("pooled_norm", pooled, shared=True)))
            fused = torch.cat(features, dim=-1)  # (K, B, parts * h)

            if cap.classifier_encoder == "own":  # every member, then the mean of their probabilities

                def member_logit(prefix: str) -> torch.Tensor:
                    own = [latent_features(f"{prefix}classifier_"), time_features(f"{prefix}classifier_")]
                    return mlp(f"{prefix}classifier", torch.cat(own, dim=-1), (0, 2, 4)).squeeze(-1)

                logit = mean_probability_logit(torch.stack([member_logit(p) for p in member_prefixes(cap)]))
            else:
                logit = mlp("classifier", fused[..., : self._classifier_width], (0, 2, 4)).squeeze(-1)
        with record_function("saferedir.token_heads"):
            context = linear("context", fused)
            per_token = tokens + context.unsqueeze(2)
            for i in range(cap.token_layers):  # TransformerEncoderLayer, norm_first, GELU, no dropout
                name = f"token_layers.{i}"
                per_token = per_token + attention(
                    f"{name}.self_attn", layer_norm(f"{name}.norm1", per_token), None
                )
                hidden = F.gelu(linear(f"{name}.linear1", layer_norm(f"{name}.norm2", per_token)))
                per_token = per_token + linear(f"{name}.linear2", hidden)
            per_token = F.silu(linear("token_mixer.1", layer_norm("token_mixer.0", per_token)))
            directions, masks = [], []
            offset = 0
            for i, (e, stream) in enumerate(zip(embeds, cfg.streams)):
                own = per_token[:, :, offset : offset + stream.seq_len]  # (K, B, T_s, h)
                offset += stream.seq_len
                direction = linear(f"delta_ups.{i}", linear("delta_down", own))
                if cap.token_layers:
                    scores = (
                        linear("copy_query", own) @ linear("copy_key", own).transpose(-1, -2) / math.sqrt(h)
                    )
                    copied = scores.softmax(dim=-1) @ e  # (K, B, T_s, D_s)
                    direction = direction + torch.sigmoid(linear("copy_gate", own)) * (copied - e)
                directions.append(direction)
                masks.append(torch.sigmoid(mlp("mask_head", own, (0, 2)).squeeze(-1)))
            alpha = torch.sigmoid(mlp("scale_head", context, (0, 2)).squeeze(-1))
            pooled_direction = pooled_mask = None
            if cfg.pooled_dim:
                pooled_direction = linear("pooled_delta.1", linear("pooled_delta.0", context))
                pooled_mask = torch.sigmoid(mlp("pooled_gate", context, (0, 2)).squeeze(-1))
        return RedirectorOutput(logit, tuple(directions), tuple(masks), alpha, pooled_direction, pooled_mask)


#: aten ops that only make views or allocate (no kernel runs): left out of :func:`kernel_ops`
METADATA_OPS = frozenset(
    "aten::" + name
    for name in (
        "view alias _reshape_alias reshape _unsafe_view as_strided as_strided_ slice narrow select "
        "expand transpose permute unsqueeze squeeze t detach split split_with_sizes chunk unbind "
        "empty empty_like empty_strided resize_ lift_fresh contiguous flatten unflatten"
    ).split()
)


def kernel_ops(fn: Callable[[], object]) -> dict[str, int]:
    """Per aten op, how many times ``fn()`` ran it, counting only ops that run work (a kernel on
    a GPU; views and allocations left out), by the profiler on the CPU."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {
        e.key: e.count
        for e in prof.key_averages()
        if e.key.startswith("aten::") and e.key not in METADATA_OPS
    }
