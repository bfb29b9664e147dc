"""ClipLstmConfig: every hyperparameter of the CLIP-encoder / LSTM-decoder captioner."""

from __future__ import annotations

import copy

from transformers import CLIPVisionConfig, PretrainedConfig

IMAGE_FEATURES = ("pooled", "projected", "patches")
# Written to config.json: `pipeline("image-to-text", model=<repo>, trust_remote_code=True)` loads this
# class from the repo's modeling file (transformers 5.x has no image-to-text pipeline of its own).
CUSTOM_PIPELINES = {
    "image-to-text": {
        "impl": "modeling_clip_lstm.ImageCaptioningPipeline",
        "pt": ["AutoModel"],
        "type": "multimodal",
    }
}


class ClipLstmConfig(PretrainedConfig):
    r"""
    Configuration of [`ClipLstmForImageCaptioning`]: a frozen CLIP vision tower whose image
    feature becomes the first input step of an LSTM caption decoder, which with `"patches"` also
    attends over the tower's tokens at every step.

    Args:
        vision_config (`dict` or `CLIPVisionConfig`, *optional*):
            The CLIP vision tower. Defaults to the shape of `openai/clip-vit-base-patch32`
            (ViT-B/32: 224 px, 32 px patches, hidden 768, 12 layers, projection 512).
        image_feature (`str`, *optional*, defaults to `"pooled"`):
            Which CLIP output feeds the decoder: `"pooled"`, the post-layernorm CLS token
            (`pooler_output`, `vision_config.hidden_size` wide, as the original project used), or
            `"projected"`, CLIP's projected image embedding (`vision_config.projection_dim` wide), or
            `"patches"`, the tower's final tokens (`last_hidden_state`: the CLS token and one token per
            patch, (1 + (image_size // patch_size) ** 2, hidden_size)), over which the decoder attends
            at every step (Show, Attend and Tell's soft attention, on the LSTM's output).
        normalize_image_embeds (`bool`, *optional*, defaults to `True`):
            L2-normalise the image feature inside the model before projecting it. Cached features
            are stored raw, so one cache serves both settings.
        embed_dim (`int`, *optional*, defaults to 512):
            Width of the token embeddings and of the projected image step.
        hidden_size (`int`, *optional*, defaults to 512):
            LSTM hidden size.
        num_layers (`int`, *optional*, defaults to 1):
            Number of stacked LSTM layers.
        dropout (`float`, *optional*, defaults to 0.2):
            Dropout on the LSTM input, between LSTM layers and before the output head.
        vocab_size (`int`, *optional*, defaults to 49409):
            Size of the caption vocabulary; follows the tokenizer (CLIP's BPE plus a pad token
            is 49,409; a caption tokenizer built from Flickr8k is about 8k).
        pad_token_id (`int`, *optional*, defaults to 49408):
            Padding token; never a training target, never generated. Must differ from EOS.
        bos_token_id (`int`, *optional*, defaults to 49406):
            Token that starts every caption (the step after the image step).
        eos_token_id (`int`, *optional*, defaults to 49407):
            Token that ends every caption; a training target.
        attention_dim (`int`, *optional*, defaults to 256):
            Width of the attention's queries and keys (only used with `image_feature="patches"`).
        attention_heads (`int`, *optional*, defaults to 1):
            Heads of that attention: the queries and keys are split into `attention_heads` parts of
            `attention_dim / attention_heads`, the projected tokens (the values) into parts of
            `embed_dim / attention_heads`, and each head reads its own part of every token, so one step
            can look at several places at once (an object's outline rather than one patch of it). No
            extra weights: a model saved with 1 head loads with 1 head. `train_accelerate.py` uses 16.
        layout_dim (`int`, *optional*, defaults to 0):
            With `"patches"`, a summary of where everything is: each projected token is cut to
            `layout_dim` numbers, and one linear layer maps all of them, in token order, to an
            `embed_dim` vector that the output layer reads at every step beside the attended context.
            Attention averages tokens and so forgets which token sat where; this keeps the grid's
            arrangement (an object's outline, the positions that captions name). 0 leaves it out, as
            models saved before it did; `train_accelerate.py` uses 16. Unused by the other features.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialiser of linear and embedding weights.
        kwargs:
            Passed to [`PretrainedConfig`]. `custom_pipelines` defaults to the image-to-text pipeline
            in modeling_clip_lstm.py, so `pipeline("image-to-text", model=..., trust_remote_code=True)` works.

    Example:
        >>> config = ClipLstmConfig(vocab_size=8000, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        >>> config.vision_config.hidden_size
        768
    """

    model_type = "clip_lstm"
    sub_configs = {"vision_config": CLIPVisionConfig}

    def __init__(
        self,
        vision_config: dict | CLIPVisionConfig | None = None,
        image_feature: str = "pooled",
        normalize_image_embeds: bool = True,
        embed_dim: int = 512,
        hidden_size: int = 512,
        num_layers: int = 1,
        dropout: float = 0.2,
        vocab_size: int = 49409,
        pad_token_id: int = 49408,
        bos_token_id: int = 49406,
        eos_token_id: int = 49407,
        attention_dim: int = 256,
        attention_heads: int = 1,
        layout_dim: int = 0,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        if vision_config is None:
            vision_config = CLIPVisionConfig()
        elif isinstance(vision_config, dict):
            vision_config = CLIPVisionConfig(**vision_config)
        elif not isinstance(vision_config, CLIPVisionConfig):
            raise ValueError(
                f"vision_config must be a dict or CLIPVisionConfig, got {type(vision_config).__name__}"
            )
        self.vision_config = vision_config
        self.image_feature = image_feature
        self.normalize_image_embeds = normalize_image_embeds
        self.embed_dim = embed_dim
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.dropout = dropout
        self.vocab_size = vocab_size
        self.attention_dim = attention_dim
        self.attention_heads = attention_heads
        self.layout_dim = layout_dim
        self.initializer_range = initializer_range
        kwargs.setdefault(
            "custom_pipelines", copy.deepcopy(CUSTOM_PIPELINES)
        )  # transformers edits it in place
        super().__init__(
            pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs
        )
        self._validate()

    @property
    def image_feature_dim(self) -> int:
        """Width of the CLIP feature the decoder reads: the projection if projected, else the hidden size."""
        if self.image_feature == "projected":
            return self.vision_config.projection_dim
        return self.vision_config.hidden_size

    @property
    def num_image_tokens(self) -> int:
        """Tokens per image the decoder attends over with `"patches"`: CLS plus one per patch (50 for ViT-B/32)."""
        vision = self.vision_config
        return 1 + (vision.image_size // vision.patch_size) ** 2

    @property
    def image_feature_shape(self) -> tuple[int, ...]:
        """Shape of one image's feature: (num_image_tokens, D) with `"patches"`, else (D,).

        Example:
            >>> ClipLstmConfig(image_feature="patches").image_feature_shape  # ViT-B/32
            (50, 768)
        """
        if self.image_feature == "patches":
            return (self.num_image_tokens, self.image_feature_dim)
        return (self.image_feature_dim,)

    def _validate(self) -> None:
        if self.image_feature not in IMAGE_FEATURES:
            raise ValueError(f"image_feature must be one of {IMAGE_FEATURES}, got {self.image_feature!r}")
        for name in (
            "embed_dim",
            "hidden_size",
            "num_layers",
            "vocab_size",
            "attention_dim",
            "attention_heads",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        patches = self.image_feature == "patches"
        if patches and (self.attention_dim % self.attention_heads or self.embed_dim % self.attention_heads):
            raise ValueError(
                f"attention_heads ({self.attention_heads}) must divide attention_dim ({self.attention_dim}) "
                f"and embed_dim ({self.embed_dim})"
            )
        if not isinstance(self.layout_dim, int) or isinstance(self.layout_dim, bool) or self.layout_dim < 0:
            raise ValueError(f"layout_dim must be a non-negative integer, got {self.layout_dim!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not float(self.initializer_range) > 0.0:
            raise ValueError(f"initializer_range must be positive, got {self.initializer_range!r}")
        ids = {
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        for name, value in ids.items():
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < self.vocab_size:
                raise ValueError(
                    f"{name} must be an integer in [0, vocab_size={self.vocab_size}), got {value!r}"
                )
        if self.pad_token_id == self.eos_token_id:
            raise ValueError(
                f"pad_token_id and eos_token_id are both {self.pad_token_id}: padding is ignored by the loss, "
                "so EOS would never be learned; give the tokenizer a distinct pad token"
            )
        if self.bos_token_id in (self.pad_token_id, self.eos_token_id):
            raise ValueError(
                f"bos_token_id {self.bos_token_id} must differ from pad_token_id and eos_token_id"
            )


__all__ = ["ClipLstmConfig"]

# config.json gets an auto_map, so AutoConfig.from_pretrained(..., trust_remote_code=True) finds this class.
ClipLstmConfig.register_for_auto_class()
