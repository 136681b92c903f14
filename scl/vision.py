"""The vision tower: CLIP ViT or SigLIP (they differ in the class token, the pre-layernorm, the patch
conv's bias and the activation), returning the hidden states LLaVA picks its features from. Module
names mirror transformers' CLIPVisionModel / SiglipVisionModel, so loading is a name map.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from scl.config import VisionConfig


ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # CLIP's sigmoid approximation of GELU
    "gelu": F.gelu,  # exact erf form (LLaVA's projector)
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),  # SigLIP
}


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.has_class_token:
            self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size,
                                         bias=not cfg.has_class_token)  # CLIP's conv has no bias, SigLIP's has
        self.position_embedding = nn.Embedding(cfg.num_patches + cfg.has_class_token, cfg.hidden_size)  # learned

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, D, S/p, S/p)
        x = x.flatten(2).transpose(1, 2)  # (B, P, D)
        if hasattr(self, "class_embedding"):
            x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)  # (B, 1+P, D)
        return x + self.position_embedding.weight  # (B, P', D)


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention with biases on q/k/v/out."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_attention_heads, d // cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = (proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim ** -0.5)  # (B, H, T, Dh)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, D)


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = VisionEmbeddings(cfg)
        if cfg.has_class_token:
            self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # (sic) CLIP's key name
        layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.encoder = nn.ModuleDict({"layers": layers})  # the checkpoint's `encoder.layers.N`
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # loaded, never applied

    def forward(self, pixel_values: torch.Tensor, num_layers: int | None = None) -> list[torch.Tensor]:
        """[embeddings, layer 1, ..., layer n], each (B, P', D); LLaVA-1.5 reads layer -2, so n may stop short."""
        x = self.embeddings(pixel_values)  # (B, P', D)
        if hasattr(self, "pre_layrnorm"):
            x = self.pre_layrnorm(x)
        states = [x]
        for layer in self.encoder.layers[:num_layers]:
            states.append(layer(states[-1]))
        return states
