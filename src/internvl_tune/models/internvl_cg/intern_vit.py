"""InternViT-6B, the vision tower of InternVL-14B, in plain PyTorch with the reference's parameter names.

Pre-norm ViT: ``x + drop_path(ls1 * attn(norm1(x)))``, ``x + drop_path(ls2 * mlp(norm2(x)))``; a class token and
learned absolute position embeddings; RMSNorm (6B) or LayerNorm; q/k RMS-normalised over all heads together.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from internvl_tune.models.common.drop_path import DropPath, linear_rates
from internvl_tune.models.internvl_cg.config import VisionConfig


class InternRMSNorm(nn.Module):
    """RMSNorm computed in fp32, cast back to the input dtype before the weight (the ViT's variant)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


def make_norm(config: VisionConfig, dim: int) -> nn.Module:
    if config.norm_type == "layer_norm":
        return nn.LayerNorm(dim, eps=config.layer_norm_eps)
    return InternRMSNorm(dim, eps=config.layer_norm_eps)


class InternVisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig, image_size: int):
        super().__init__()
        dim = config.hidden_size
        self.patch_size = config.patch_size
        self.class_embedding = nn.Parameter(torch.randn(1, 1, dim))
        self.patch_embedding = nn.Conv2d(config.num_channels, dim, kernel_size=self.patch_size, stride=self.patch_size)
        num_positions = (image_size // self.patch_size) ** 2 + 1
        self.position_embedding = nn.Parameter(torch.randn(1, num_positions, dim))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype)).flatten(2).transpose(1, 2)  # [B, N, C]
        cls = self.class_embedding.expand(pixel_values.shape[0], 1, -1).to(dtype)
        x = torch.cat([cls, patches], dim=1)
        if x.shape[1] != self.position_embedding.shape[1]:
            raise ValueError(
                f"images give {x.shape[1] - 1} patches but the position embedding has "
                f"{self.position_embedding.shape[1] - 1}; resize the images to the model's image size"
            )
        return x + self.position_embedding.to(dtype)


class InternAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        if self.embed_dim % self.num_heads:
            raise ValueError(f"vision hidden_size {self.embed_dim} is not divisible by {self.num_heads} heads")
        self.head_dim = self.embed_dim // self.num_heads
        self.qkv = nn.Linear(self.embed_dim, 3 * self.embed_dim, bias=config.qkv_bias)
        self.attn_dropout = config.attention_dropout
        self.proj_drop = nn.Dropout(config.dropout)
        self.qk_normalization = config.qk_normalization
        if self.qk_normalization:
            # The reference always uses RMSNorm here, whatever norm_type says.
            self.q_norm = InternRMSNorm(self.embed_dim, eps=config.layer_norm_eps)
            self.k_norm = InternRMSNorm(self.embed_dim, eps=config.layer_norm_eps)
        self.proj = nn.Linear(self.embed_dim, self.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, C).unbind(2)  # each [B, N, C], heads side by side
        if self.qk_normalization:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(B, N, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_dropout if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))


class InternMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.act = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class InternVisionEncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig, drop_path_rate: float):
        super().__init__()
        dim = config.hidden_size
        self.attn = InternAttention(config)
        self.mlp = InternMLP(config)
        self.norm1 = make_norm(config, dim)
        self.norm2 = make_norm(config, dim)
        self.ls1 = nn.Parameter(config.initializer_factor * torch.ones(dim))
        self.ls2 = nn.Parameter(config.initializer_factor * torch.ones(dim))
        self.drop_path1 = DropPath(drop_path_rate)
        self.drop_path2 = DropPath(drop_path_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)) * self.ls1)
        return x + self.drop_path2(self.mlp(self.norm2(x)) * self.ls2)


class InternVisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        # Stochastic depth grows linearly from 0 at the first layer to drop_path_rate at the last.
        rates = linear_rates(config.drop_path_rate, config.num_hidden_layers)
        self.layers = nn.ModuleList(InternVisionEncoderLayer(config, r) for r in rates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class InternVisionModel(nn.Module):
    """Patch embedding + encoder; returns the last hidden state ``[B, 1 + N, C]`` (class token first)."""

    def __init__(self, config: VisionConfig, image_size: int | None = None):
        super().__init__()
        self.config = config
        self.embeddings = InternVisionEmbeddings(config, image_size or config.image_size)
        self.encoder = InternVisionEncoder(config)

    @property
    def image_size(self) -> int:
        grid = int(round((self.embeddings.position_embedding.shape[1] - 1) ** 0.5))
        return grid * self.config.patch_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must be [B, 3, H, W], got {tuple(pixel_values.shape)}")
        return self.encoder(self.embeddings(pixel_values))


def interpolate_pos_embedding(pos: torch.Tensor, new_grid: int) -> torch.Tensor:
    """``[1, 1 + g*g, C]`` -> ``[1, 1 + new_grid**2, C]``: bicubic in fp32 (align_corners=False), cast back."""
    cls, patches = pos[:, :1], pos[:, 1:]
    grid = int(round(patches.shape[1] ** 0.5))
    dim = pos.shape[-1]
    patches = patches.reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
    patches = F.interpolate(patches.float(), size=new_grid, mode="bicubic", align_corners=False)
    patches = patches.to(pos.dtype).reshape(1, dim, -1).permute(0, 2, 1)
    return torch.cat([cls, patches], dim=1)
