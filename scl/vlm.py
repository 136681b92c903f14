"""LLaVA: vision tower -> projector -> LLM. An image becomes P feature vectors that overwrite the P
`<image>` tokens the prompt already holds; the rest is a plain decoder. Names are the Hub checkpoint's.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from scl.config import VLMConfig
from scl.llm import CausalLM
from scl.vision import ACTIVATIONS, VisionTower


class MultiModalProjector(nn.Module):
    """linear -> GELU -> linear, from the vision width (x number of feature layers) to the LLM width."""

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        d_in = cfg.vision_config.hidden_size * len(cfg.feature_layers)
        d, bias = cfg.text_config.hidden_size, cfg.multimodal_projector_bias
        self.linear_1 = nn.Linear(d_in, d, bias=bias)
        self.act = ACTIVATIONS[cfg.projector_hidden_act]
        self.linear_2 = nn.Linear(d, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class VLM(nn.Module):
    def __init__(self, config: VLMConfig):
        super().__init__()
        self.config = config
        self.vision_tower = VisionTower(config.vision_config)
        self.multi_modal_projector = MultiModalProjector(config)
        self.language_model = CausalLM(config.text_config)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The (V, D) output matrix: `lm_head.weight`, or the embedding matrix when tied."""
        head = getattr(self.language_model, "lm_head", None)
        return head.weight if head is not None else self.language_model.model.embed_tokens.weight

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, 3, S, S) -> projected features (B, P, D) that replace the image tokens."""
        v = self.config.vision_config
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (v.num_channels, v.image_size, v.image_size):
            raise ValueError(f"pixel_values must be (B, {v.num_channels}, {v.image_size}, {v.image_size}), "
                             f"got {tuple(pixel_values.shape)}")
        layers = [layer % (v.num_hidden_layers + 1) for layer in self.config.feature_layers]  # -2: second-to-last
        states = self.vision_tower(pixel_values, num_layers=max(layers))  # skip layers nobody reads
        feats = torch.cat([states[i] for i in layers], dim=-1)  # (B, P', D_vis * n_layers)
        if self.config.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]  # drop CLS (transformers drops token 0 for SigLIP too)
        return self.multi_modal_projector(feats)  # (B, P, D)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (B, T, D) with image features written over the image-token positions, in order."""
        x = self.language_model.model.embed_tokens(input_ids)  # (B, T, D)
        if pixel_values is None:
            return x
        feats = self.image_features(pixel_values).to(x.dtype)  # (B_img, P, D)
        is_image = input_ids == self.config.image_token_index  # (B, T)
        n_images, P = feats.shape[:2]
        # The count check reads a tensor value; under torch.compile that would split the graph, and
        # the compiled SFT step always feeds conversations rendered with the right count.
        if not torch.compiler.is_compiling() and (n_tokens := int(is_image.sum())) != n_images * P:
            raise ValueError(f"input_ids hold {n_tokens} image tokens (id {self.config.image_token_index}) but "
                             f"pixel_values give {n_images} image(s) x {P} features = {n_images * P}")
        # row-major order: the k-th image token (scanning batch then time) gets the k-th feature vector
        return x.masked_scatter(is_image[..., None], feats)

    def forward_hidden(self, input_ids, pixel_values=None, attention_mask=None, position_ids=None,
                       past_key_values=None, use_cache=True):
        """-> (hidden (B, T, D) after the final norm, new past_key_values or None). See scl/llm.py."""
        x = self.embed(input_ids, pixel_values)
        return self.language_model.model(x, attention_mask, position_ids, past_key_values, use_cache=use_cache)

    def forward(self, input_ids, pixel_values=None, attention_mask=None) -> torch.Tensor:
        """-> logits (B, T, V) in fp32."""
        h, _ = self.forward_hidden(input_ids, pixel_values, attention_mask, use_cache=False)
        return F.linear(h, self.lm_head_weight).float()  # (B, T, V)
