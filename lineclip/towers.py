"""The two towers: DINOv2 for line images, the ByT5 encoder for transcriptions, and their projection heads.

Both towers and the logit scale live in one `DualEncoder`, so that `accelerator.prepare` wraps all of them
and every training forward goes through the wrapper (DDP all-reduces every gradient). The heads are laid
out exactly as the PechaBridge Workbench rebuilds them: `net.0` / `net.2`, hidden `max(2*out, in//2, 32)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    ByT5Tokenizer,
    Dinov2Config,
    Dinov2Model,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    T5Config,
    T5EncoderModel,
)
from transformers.utils import logging as hf_logging

from lineclip.patches import patch_hw
from lineclip.preprocess import IMAGENET_MEAN, IMAGENET_STD
from lineclip.reading import BagHead, ReadingHead


def head_hidden_dim(input_dim: int, output_dim: int) -> int:
    return max(2 * output_dim, input_dim // 2, 32)


class ProjectionHead(nn.Module):
    def __init__(self, input_dim: int, output_dim: int) -> None:
        super().__init__()
        self.input_dim, self.output_dim = input_dim, output_dim
        hidden = head_hidden_dim(input_dim, output_dim)
        self.net = nn.Sequential(nn.Linear(input_dim, hidden), nn.GELU(), nn.Linear(hidden, output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def save(self, path: str | Path) -> None:
        """The Workbench format: a dict with `state_dict`, `input_dim`, `output_dim`."""
        state = {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}
        torch.save({"state_dict": state, "input_dim": self.input_dim, "output_dim": self.output_dim}, path)

    @classmethod
    def load(cls, path: str | Path) -> ProjectionHead:
        """A head saved by `save` (weights_only=True). The declared dims are checked against the tensors the file
        really holds before the head is built: a small file declaring 12000 x 12000 would otherwise allocate
        gigabytes first and be refused only then. ValueError says what does not fit."""
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or not isinstance(blob.get("state_dict"), dict):
            raise ValueError("not a projection head (a dict with state_dict, input_dim, output_dim)")
        dims = blob.get("input_dim"), blob.get("output_dim")
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dims):
            raise ValueError(f"input_dim and output_dim must be positive integers, got {dims[0]!r:.40}, "
                             f"{dims[1]!r:.40}")
        hidden = head_hidden_dim(*dims)
        expected = {"net.0.weight": (hidden, dims[0]), "net.0.bias": (hidden,), "net.2.weight": (dims[1], hidden),
                    "net.2.bias": (dims[1],)}
        state = blob["state_dict"]
        found = {k: tuple(v.shape) if isinstance(v, torch.Tensor) and v.is_floating_point() else None
                 for k, v in state.items()}
        if found != expected:
            raise ValueError(f"its tensors {found} are not those of a head of input_dim {dims[0]}, output_dim "
                             f"{dims[1]} ({expected})")
        head = cls(*dims)
        head.load_state_dict(state)
        return head


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


@dataclass
class Embeddings:
    image: torch.Tensor | None
    text: torch.Tensor | None
    logit_scale: torch.Tensor
    reading_logits: torch.Tensor | None = None  # [B, frames, classes], training only (lineclip.reading)
    bag_logits: torch.Tensor | None = None  # [B, parts * classes], training only
    text_bag_logits: torch.Tensor | None = None  # [B, parts * classes], training only
    logit_bias: torch.Tensor | None = None  # only a model trained with the sigmoid loss (loss=siglip) has one


class DualEncoder(nn.Module):
    """DINOv2 CLS (`pooler_output`) -> head; ByT5 encoder -> masked mean -> head; a learnable logit scale."""

    def __init__(
        self,
        image_backbone: PreTrainedModel,
        text_encoder: PreTrainedModel,
        projection_dim: int = 256,
        temperature: float = 0.07,
        learnable_temperature: bool = True,
        max_logit_scale: float = 100.0,
        reading_frames_per_column: int | None = None,
        reading_bag: bool = False,
        text_bag: bool = False,
        bag_parts: int = 1,
        logit_bias: float | None = None,
    ) -> None:
        super().__init__()
        self.image_backbone = image_backbone
        self.text_encoder = text_encoder
        self.image_head = ProjectionHead(image_backbone.config.hidden_size, projection_dim)
        self.text_head = ProjectionHead(text_encoder.config.d_model, projection_dim)
        # Stored as a log so that it stays positive; clamped at max_logit_scale as CLIP does.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)), requires_grad=learnable_temperature)
        self.max_logit_scale = max_logit_scale
        # The auxiliary reading head (CTC over patch columns) exists only in training: never in a bundle.
        self.reading_head = (ReadingHead(image_backbone.config.hidden_size, reading_frames_per_column)
                             if reading_frames_per_column else None)
        # Bags of characters (a PHOC pyramid of `bag_parts` parts) on what each tower embeds: training only.
        self.bag_head = BagHead(image_backbone.config.hidden_size, bag_parts) if reading_bag else None
        self.text_bag_head = BagHead(text_encoder.config.d_model, bag_parts) if text_bag else None
        # SigLIP's learnable bias (init -10): only when training with the sigmoid loss, so InfoNCE models and
        # their checkpoints keep exactly the parameters they had. Retrieval (cosine ranking) never uses it.
        self.logit_bias = nn.Parameter(torch.tensor(float(logit_bias))) if logit_bias is not None else None
        # DINOv2's mask_token is used only for masked-image pretraining: frozen, so DDP needs no
        # find_unused_parameters (which costs a graph traversal every step).
        mask_token = getattr(getattr(image_backbone, "embeddings", None), "mask_token", None)
        if mask_token is not None:
            mask_token.requires_grad_(False)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._encode_image(pixel_values)[0]

    def _encode_image(self, pixel_values: torch.Tensor, read: bool | None = None) -> tuple[
            torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        # read: the reading head's logits too (default: while training); validation and evaluate ask for them in
        # eval mode to decode what the tower reads (lineclip.reading.greedy_decode).
        reads = self.reading_head is not None and (self.training if read is None else read)
        out = self.image_backbone(pixel_values=pixel_values, output_hidden_states=reads)
        embedding = F.normalize(self.image_head(out.pooler_output).float(), dim=-1)
        reading = bag = None
        if reads:
            rows = pixel_values.shape[-2] // patch_hw(self.image_backbone.config.patch_size)[0]
            # The last layer's output before the final norm (see ReadingHead); token 0 is the CLS token (this
            # DINOv2 has no register tokens), the rest are the patches, row-major.
            reading = self.reading_head(out.hidden_states[-1][:, 1:], rows)
        if self.bag_head is not None and self.training:
            bag = self.bag_head(out.pooler_output)
        return embedding, reading, bag

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._encode_text(input_ids, attention_mask)[0]

    def _encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[
            torch.Tensor, torch.Tensor | None]:
        hidden = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = masked_mean(hidden, attention_mask)
        bag = self.text_bag_head(pooled) if self.text_bag_head is not None and self.training else None
        return F.normalize(self.text_head(pooled).float(), dim=-1), bag

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=self.max_logit_scale)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> Embeddings:
        image, reading, bag = self._encode_image(pixel_values) if pixel_values is not None else (None, None, None)
        text, text_bag = self._encode_text(input_ids, attention_mask) if input_ids is not None else (None, None)
        return Embeddings(image=image, text=text, logit_scale=self.scale(), logit_bias=self.logit_bias,
                          reading_logits=reading, bag_logits=bag, text_bag_logits=text_bag)


def build_image_backbone(name_or_path: str | None, config: dict, trust_remote_code: bool = False,
                         attn_implementation: str | None = None) -> PreTrainedModel:
    if name_or_path:
        # The hub path and a local save_pretrained dir are the same call.
        return Dinov2Model.from_pretrained(name_or_path, trust_remote_code=trust_remote_code,
                                           attn_implementation=attn_implementation)
    return Dinov2Model(Dinov2Config(**config, attn_implementation=attn_implementation))


def build_image_processor(name_or_path: str | None, target_height: int) -> Any:
    """The processor saved beside the backbone: the Workbench reads `image_mean`/`image_std` from it."""
    if name_or_path:
        try:
            return AutoImageProcessor.from_pretrained(name_or_path)
        except OSError:
            pass  # a backbone dir saved without a processor: fall back to DINOv2's ImageNet statistics
    # Imported here, quietly: transformers warns at import that its torchvision backend is missing, and
    # lineclip only uses the processor to carry mean/std into preprocessor_config.json.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        from transformers import BitImageProcessor
    finally:
        hf_logging.set_verbosity(verbosity)
    return BitImageProcessor(
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        size={"shortest_edge": target_height},
        do_center_crop=False,
    )


def build_text_encoder(name_or_path: str | None, config: dict, trust_remote_code: bool = False,
                       attn_implementation: str | None = None) -> PreTrainedModel:
    if name_or_path:
        # T5EncoderModel drops the decoder weights of a full ByT5 checkpoint: never loaded, never saved.
        return T5EncoderModel.from_pretrained(name_or_path, trust_remote_code=trust_remote_code,
                                              attn_implementation=attn_implementation)
    return T5EncoderModel(T5Config(**{"is_encoder_decoder": False, "use_cache": False, **config},
                                   attn_implementation=attn_implementation))


def build_tokenizer(name_or_path: str | None) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(name_or_path) if name_or_path else ByT5Tokenizer()
    if not isinstance(tokenizer, ByT5Tokenizer):
        raise ValueError(
            f"text encoder {name_or_path!r} has a {type(tokenizer).__name__}; lineclip batches text as ByT5 bytes"
        )
    return tokenizer
