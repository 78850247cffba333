"""A small Llama-style decoder-only language model written in plain PyTorch.

Module names follow Hugging Face's ``LlamaForCausalLM`` (``model.embed_tokens``,
``model.layers[i].self_attn.q_proj``, ``model.layers[i].mlp.gate_proj``, ``lm_head``, ...), so
recipes whose targets and ignore patterns were written for Llama apply unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from transformers import LlamaConfig


@dataclass
class TinyDecoderConfig:
    """Hyper-parameters of :class:`TinyDecoder`.

    Attributes:
        vocab_size: Number of token ids (256 for the byte tokenizer).
        hidden_size: Width of the residual stream.
        intermediate_size: Width of the SwiGLU feed-forward block.
        num_layers: Number of decoder layers.
        num_heads: Number of query heads.
        num_kv_heads: Number of key/value heads (grouped-query attention).
        max_seq_len: Longest sequence the model was trained on.
        rope_theta: Base of the rotary position embedding frequencies.
        rms_norm_eps: Epsilon of the RMS normalisation layers.
    """

    vocab_size: int = 256
    hidden_size: int = 256
    intermediate_size: int = 768
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by "
                f"num_heads ({self.num_heads})"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be divisible by "
                f"num_kv_heads ({self.num_kv_heads})"
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        """Return the configuration as a JSON-serialisable dictionary.

        Returns:
            A mapping from field name to value.
        """
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TinyDecoderConfig:
        """Build a configuration from a dictionary such as the one :meth:`to_dict` returns.

        Args:
            data: Mapping from field name to value; missing fields take their defaults.

        Returns:
            The configuration.

        Raises:
            ValueError: If ``data`` contains keys that are not configuration fields.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown TinyDecoderConfig fields: {unknown}")
        return cls(**data)


class RMSNorm(nn.Module):
    """Root-mean-square layer normalisation with a learned scale.

    Args:
        hidden_size: Size of the normalised (last) dimension.
        eps: Added to the mean square for numerical stability.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Normalise ``hidden_states`` over its last dimension.

        Args:
            hidden_states: Tensor of shape ``[..., hidden_size]``.

        Returns:
            The normalised tensor, in the input's dtype.
        """
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(hidden_states.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute rotary embedding tables for the given positions.

    Args:
        position_ids: Integer tensor of shape ``[batch, seq]``.
        head_dim: Width of one attention head (must be even).
        theta: Base of the frequencies.
        dtype: Dtype of the returned tables.

    Returns:
        ``(cos, sin)``, each of shape ``[batch, 1, seq, head_dim]``.
    """
    exponents = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32)
    inv_freq = 1.0 / (theta ** (exponents / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


class Attention(nn.Module):
    """Causal grouped-query self-attention with rotary position embeddings.

    Args:
        config: Model configuration.
    """

    def __init__(self, config: TinyDecoderConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.rope_theta = config.rope_theta
        kv_size = config.num_kv_heads * config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, kv_size, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, kv_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
    ) -> torch.Tensor:
        """Attend causally over ``hidden_states``.

        Args:
            hidden_states: Tensor of shape ``[batch, seq, hidden_size]``.
            attention_mask: Optional ``[batch, seq]`` mask, 1 for real tokens and 0 for padding.
            position_ids: Integer tensor of shape ``[batch, seq]``.

        Returns:
            Tensor of shape ``[batch, seq, hidden_size]``.
        """
        batch, seq, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(batch, seq, self.num_heads, self.head_dim)
        k = self.k_proj(hidden_states).view(batch, seq, self.num_kv_heads, self.head_dim)
        v = self.v_proj(hidden_states).view(batch, seq, self.num_kv_heads, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

        cos, sin = rotary_cos_sin(position_ids, self.head_dim, self.rope_theta, q.dtype)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin

        groups = self.num_heads // self.num_kv_heads
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)

        if attention_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            causal = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
            # Every query may attend to itself, so rows of padding never become all-masked (NaN).
            diagonal = torch.eye(seq, dtype=torch.bool, device=q.device)
            keep = causal & (attention_mask.bool()[:, None, None, :] | diagonal)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        out = out.transpose(1, 2).reshape(batch, seq, -1)
        return self.o_proj(out)


class MLP(nn.Module):
    """SwiGLU feed-forward block.

    Args:
        config: Model configuration.
    """

    def __init__(self, config: TinyDecoderConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Apply ``down_proj(silu(gate_proj(x)) * up_proj(x))``.

        Args:
            hidden_states: Tensor of shape ``[..., hidden_size]``.

        Returns:
            Tensor of the same shape.
        """
        return self.down_proj(F.silu(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


class DecoderLayer(nn.Module):
    """Pre-norm transformer block: attention then SwiGLU, each with a residual connection.

    Args:
        config: Model configuration.
    """

    def __init__(self, config: TinyDecoderConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the block.

        Args:
            hidden_states: Tensor of shape ``[batch, seq, hidden_size]``.
            attention_mask: Optional ``[batch, seq]`` mask, 1 for real tokens and 0 for padding;
                combined with the causal mask.
            position_ids: Optional ``[batch, seq]`` positions for the rotary embedding;
                defaults to ``0 .. seq - 1``.

        Returns:
            Tensor of shape ``[batch, seq, hidden_size]``.
        """
        if position_ids is None:
            batch, seq = hidden_states.shape[:2]
            position_ids = torch.arange(seq, device=hidden_states.device).expand(batch, seq)
        hidden_states = hidden_states + self.self_attn(
            self.input_layernorm(hidden_states), attention_mask, position_ids
        )
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class DecoderBackbone(nn.Module):
    """Token embedding, decoder layers and final norm (Llama's ``model`` submodule).

    Args:
        config: Model configuration.
    """

    def __init__(self, config: TinyDecoderConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Compute the final hidden states.

        Args:
            input_ids: Integer tensor of shape ``[batch, seq]``.
            attention_mask: Optional ``[batch, seq]`` mask, 1 for real tokens and 0 for padding.

        Returns:
            Tensor of shape ``[batch, seq, hidden_size]``.
        """
        batch, seq = input_ids.shape
        position_ids = torch.arange(seq, device=input_ids.device).expand(batch, seq)
        hidden_states = self.embed_tokens(input_ids)
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask, position_ids)
        return self.norm(hidden_states)


class TinyDecoder(nn.Module):
    """Small Llama-style causal language model.

    Args:
        config: Model configuration; defaults to :class:`TinyDecoderConfig()`.
    """

    def __init__(self, config: TinyDecoderConfig | None = None) -> None:
        super().__init__()
        self.config = config or TinyDecoderConfig()
        self.model = DecoderBackbone(self.config)
        self.lm_head = nn.Linear(self.config.hidden_size, self.config.vocab_size, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Compute next-token logits.

        Args:
            input_ids: Integer tensor of shape ``[batch, seq]``.
            attention_mask: Optional ``[batch, seq]`` mask, 1 for real tokens and 0 for padding.

        Returns:
            Logits of shape ``[batch, seq, vocab_size]``.
        """
        return self.lm_head(self.model(input_ids, attention_mask))

    def pretrained_config(self) -> LlamaConfig:
        """The transformers config of the model this one computes exactly, for export.

        Returns:
            A ``LlamaConfig`` naming ``LlamaForCausalLM`` (untied embeddings, no biases, SiLU,
            default RoPE).

        Raises:
            ImportError: without the ``hf`` extra (transformers).
        """
        from transformers import LlamaConfig

        config = self.config
        return LlamaConfig(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            max_position_embeddings=config.max_seq_len,
            rope_theta=config.rope_theta,
            rms_norm_eps=config.rms_norm_eps,
            hidden_act="silu",
            attention_bias=False,
            mlp_bias=False,
            tie_word_embeddings=False,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
            architectures=["LlamaForCausalLM"],
        )
