"""Text encoding with CLIP (latent diffusion, seed 003: Stable Diffusion's ``cond_stage_config``).

``CLIPTextEncoder`` wraps transformers' ``CLIPTextModel`` and a tokenizer and follows the same text-encoder
protocol as :class:`~imagen_lib.text.T5TextEncoder` (:class:`imagen_lib.protocols.TextEncoder`), so the
cascade, the trainer, checkpoints and ``imagen-lib precache`` use either without knowing which.

Seed 003's ``layer`` option chooses the output: ``"last"`` is the last layer's output after CLIP's final layer
norm (``last_hidden_state``, Stable Diffusion 1.x), ``"penultimate"`` the output of the layer before it passed
through the same final layer norm (Stable Diffusion 2.x, the seed's configurations). Captions are padded to
77 tokens (CLIP's context) and, as Stable Diffusion does, every position is attended by default: the causal
text transformer makes a real token's output independent of the padding after it, and SD's U-Net was trained
on the padding positions' outputs too. ``mask_padding=True`` masks them out instead (T5TextEncoder's rule).

For tests and CPU examples without pretrained weights, :meth:`CLIPTextEncoder.build_tiny` builds a small random
``CLIPTextModel`` with a real ``CLIPTokenizer`` whose byte-level BPE vocabulary is written here: the 256
byte symbols (so any text tokenizes) plus, given a word list, merges that make each word one token.

transformers is imported inside functions only. This module does not import :mod:`imagen_lib.text` (which
dispatches to it by kind); what the two encoders share is in :mod:`imagen_lib.text_common`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor, nn

from imagen_lib.text_common import PretrainedTextEncoder, build_random_and_reload, quiet_transformers, resolve_dtype
from imagen_lib.validation import check_int, check_texts, typechecked

CLIP_LAYERS = ("last", "penultimate")
Layer = Literal["last", "penultimate"]
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"

# The default tiny encoder: small enough to run in CPU tests and examples in seconds.
TINY_CLIP_DEFAULTS = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                      "num_attention_heads": 4, "projection_dim": 64}
def _sources(name_or_path: str) -> tuple[dict, dict]:
    """``from_pretrained`` arguments of the model and of the tokenizer: a local Stable Diffusion pipeline folder
    keeps them in ``text_encoder/`` and ``tokenizer/``; anything else holds both itself."""
    root = Path(name_or_path)
    if (root / "text_encoder" / "config.json").is_file() and (root / "tokenizer").is_dir():
        return {"subfolder": "text_encoder"}, {"subfolder": "tokenizer"}
    return {}, {}


def _transformer(model: nn.Module) -> nn.Module:
    """The module holding ``encoder`` and ``final_layer_norm``: ``CLIPTextModel`` itself in transformers 5,
    its ``text_model`` before."""
    return getattr(model, "text_model", model)


class CLIPTextEncoder(PretrainedTextEncoder):
    """A CLIP text transformer that turns captions into ``(embeds, mask)``.

    Args:
        name_or_path: a hub name (``"openai/clip-vit-large-patch14"``, SD 1.x's encoder) or a local folder with
            a ``CLIPTextModel`` (or a whole ``CLIPModel``) and its tokenizer; a local Stable Diffusion pipeline
            folder (``text_encoder/`` + ``tokenizer/``) works too.
        max_length: tokens per caption, start and end tokens included, default 77 (CLIP's context; at most the
            model's ``max_position_embeddings``). Captions are always padded to it.
        layer: ``"penultimate"`` (default; SD 2.x and seed 003) or ``"last"`` (SD 1.x).
        mask_padding: False (default, Stable Diffusion): the mask is all True and padded positions keep CLIP's
            outputs; True: the mask is True for real tokens only and padded positions are exactly 0.
        dtype: weights' dtype (default as saved; ``"float16"``/``"bfloat16"`` halve the memory).
        device: where the encoder lives (default CPU; the cascade moves it with itself).
        trainable: False (default: frozen, eval mode, no gradients) or True (trained jointly with the cascade,
            saved in checkpoints). With ``layer="penultimate"`` the last transformer layer stays frozen: it does
            not reach the output.
        source: how this encoder was obtained, stored in :attr:`config` (set by :meth:`build_tiny`).
    """

    kind = "clip"

    def __init__(
        self, name_or_path: Union[str, Path], max_length: int = 77, layer: Layer = "penultimate",
        mask_padding: bool = False, dtype: Union[None, str, torch.dtype] = None,
        device: Union[None, str, torch.device] = None, trainable: bool = False, source: Optional[dict] = None,
    ):
        super().__init__()
        from transformers import AutoTokenizer, CLIPTextModel  # lazy: transformers is heavy

        if layer not in CLIP_LAYERS:
            raise ValueError(f"layer: expected one of {list(CLIP_LAYERS)}, got {layer!r}")
        self.max_length = check_int("max_length", max_length, low=1)
        self.name_or_path, self.layer = str(name_or_path), layer
        self.mask_padding, self.trainable = bool(mask_padding), bool(trainable)
        self.source = dict(source) if source is not None else {"name_or_path": self.name_or_path}
        torch_dtype = resolve_dtype(dtype)
        model_args, tokenizer_args = _sources(self.name_or_path)
        if torch_dtype is not None:
            model_args["dtype"] = torch_dtype
        with quiet_transformers():
            self.tokenizer = AutoTokenizer.from_pretrained(self.name_or_path, **tokenizer_args)
            self.model = CLIPTextModel.from_pretrained(self.name_or_path, **model_args)
        self._check_model()
        if device is not None:
            self.model.to(device)
        self.set_trainable(self.trainable)

    def _check_model(self) -> None:
        config = self.model.config
        if self.max_length > config.max_position_embeddings:
            raise ValueError(f"max_length: this CLIP has {config.max_position_embeddings} positions, "
                             f"got {self.max_length}")
        if self.layer == "penultimate" and config.num_hidden_layers < 2:
            raise ValueError("layer: 'penultimate' needs a CLIP of at least 2 layers, this one has "
                             f"{config.num_hidden_layers}")

    # ----------------------------------------------------------------------------------------------------

    @classmethod
    def build_tiny(
        cls, folder: Union[None, str, Path] = None, *, seed: int = 0, max_length: int = 77,
        layer: Layer = "penultimate", mask_padding: bool = False, trainable: bool = False,
        vocabulary: Optional[Sequence[str]] = None, **clip_config: Any,
    ) -> "CLIPTextEncoder":
        """A small randomly initialised CLIP text model, for quickstarts and tests.

        The tokenizer is a ``CLIPTokenizer`` over the 256 byte symbols (one token per character) and, given
        ``vocabulary``, merges that make each of those words one token (:func:`clip_tokenizer`). The model is
        ``CLIPTextConfig(vocab_size=..., **TINY_CLIP_DEFAULTS | clip_config)`` with weights drawn under
        ``seed``, saved with ``save_pretrained`` into ``folder`` (a temporary folder, removed after loading,
        when None) and loaded back from there, the path a pretrained CLIP takes.
        """
        from transformers import CLIPTextModel

        options = {**TINY_CLIP_DEFAULTS, **clip_config}
        tokenizer = clip_tokenizer(vocabulary)
        source = {"build_tiny": options, "seed": check_int("seed", seed)}
        if vocabulary is not None:
            source["vocabulary"] = list(vocabulary)
        return build_random_and_reload(
            CLIPTextModel, _tiny_clip_config(tokenizer, options), tokenizer, seed=seed, folder=folder,
            prefix="imagen_lib_clip_", load=lambda target: cls(
                target, max_length=max_length, layer=layer, mask_padding=mask_padding, trainable=trainable,
                source=source))

    def _freeze_unused(self) -> None:
        if self.layer == "penultimate":  # its output is never used: no gradient would ever reach it
            _transformer(self.model).encoder.layers[-1].requires_grad_(False)

    @property
    def embed_dim(self) -> int:
        """Width of each token embedding (``hidden_size``: 768 for SD 1.x's CLIP ViT-L, 1024 for SD 2's
        OpenCLIP ViT-H)."""
        return int(self.model.config.hidden_size)

    @property
    def config(self) -> dict:
        """Plain JSON values describing this encoder (stored in checkpoints; ``kind`` selects the class)."""
        return {"kind": self.kind, "source": dict(self.source), "max_length": self.max_length, "layer": self.layer,
                "mask_padding": self.mask_padding, "trainable": self.trainable}

    # ----------------------------------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Token ids and the bool mask of real tokens (start and end included), (B, max_length), on the
        encoder's device, for a non-empty list of strings."""
        texts = check_texts("texts", texts)
        tokens = self.tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device).bool()

    def hidden_states(self, ids: Tensor, model: Optional[nn.Module] = None) -> Tensor:
        """The chosen layer's output (B, N, embed_dim) for token ids ``ids`` through ``model`` (default this
        encoder's): ``last_hidden_state``, or ``final_layer_norm(hidden_states[-2])`` for ``"penultimate"``.
        No attention mask is passed, as Stable Diffusion calls CLIP."""
        model = self.model if model is None else model
        if self.layer == "last":
            return model(input_ids=ids).last_hidden_state
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-2]
        return _transformer(model).final_layer_norm(hidden)

    @typechecked
    def encode(self, texts: Sequence[str], model: Optional[nn.Module] = None) -> tuple[Tensor, Tensor]:
        """``(embeds, mask)`` for a list of captions, encoded as one batch.

        ``embeds`` (B, max_length, embed_dim) on the encoder's device; ``mask`` (B, max_length) bool: all True,
        or with ``mask_padding`` True for real tokens only (padded positions of ``embeds`` then exactly 0).
        Gradients flow only when ``trainable``. ``model``: another copy of this encoder's CLIP model to encode
        with (the trainer's EMA copy), run in eval mode and without gradients [None: this encoder's own].
        """
        ids, real = self.tokenize(texts)
        if model is None:
            with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
                hidden = self.hidden_states(ids)
        else:
            hidden = self._hidden_in_eval_mode(model, ids)
        if not self.mask_padding:
            return hidden, torch.ones_like(real)
        return hidden * real.unsqueeze(-1).to(hidden.dtype), real

    @torch.no_grad()
    def _hidden_in_eval_mode(self, model: nn.Module, ids: Tensor) -> Tensor:
        was_training = model.training
        model.eval()
        try:
            return self.hidden_states(ids, model)
        finally:
            model.train(was_training)

    def forward(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Same as :meth:`encode` (so a distributed wrapper sees the call)."""
        return self.encode(texts)

    def __repr__(self) -> str:
        return (f"CLIPTextEncoder({self.name_or_path!r}, max_length={self.max_length}, layer={self.layer!r}, "
                f"embed_dim={self.embed_dim}, trainable={self.trainable})")


# ---------------------------------------------------------------------------------------------------------
# the tiny encoder's tokenizer and configuration
# ---------------------------------------------------------------------------------------------------------


def clip_tokenizer(vocabulary: Optional[Sequence[str]] = None):
    """A ``CLIPTokenizer`` with a byte-level BPE vocabulary written here: the 256 byte symbols and their
    end-of-word forms (any text tokenizes, one token per character), CLIP's start and end tokens (the end token
    also pads), and, for each word of ``vocabulary`` (normalised and split as CLIP splits text: letters, single
    digits, runs of punctuation), merges that make it one token. Longer words' merges come first, so a shorter
    word's merge never splits a longer word."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    if vocabulary is not None and (isinstance(vocabulary, str) or not vocabulary
                                   or not all(isinstance(w, str) and w.strip() for w in vocabulary)):
        raise ValueError(f"vocabulary: expected None or a non-empty list of words, got {vocabulary!r}")
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate([*symbols, *(s + "</w>" for s in symbols)])}
    base = CLIPTokenizer(vocab={**vocab, BOS_TOKEN: len(vocab), EOS_TOKEN: len(vocab) + 1}, merges=[])
    pieces = set()
    for word in vocabulary or []:
        normalised = base.backend_tokenizer.normalizer.normalize_str(word)
        pieces.update(p for p, _ in base.backend_tokenizer.pre_tokenizer.pre_tokenize_str(normalised))
    merges = []
    for piece in sorted(pieces, key=lambda p: (-len(p), p)):
        merged = piece[0]
        for symbol in [*piece[1:-1], piece[-1] + "</w>"] if len(piece) > 1 else []:
            pair, merged = (merged, symbol), merged + symbol
            if merged not in vocab:
                merges.append(pair)
                vocab[merged] = len(vocab)
    vocab.update({BOS_TOKEN: len(vocab), EOS_TOKEN: len(vocab) + 1})
    return CLIPTokenizer(vocab=vocab, merges=merges)


# CLIPTextConfig fields that count something: a zero or negative value builds no model
_CLIP_SIZES = ("hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers", "num_attention_heads",
               "max_position_embeddings")


def _tiny_clip_config(tokenizer, options: dict):
    """The ``CLIPTextConfig`` of :meth:`CLIPTextEncoder.build_tiny`, its options checked: known fields only,
    sizes >= 1 (errors name the field as ``clip_config.NAME``)."""
    from transformers import CLIPTextConfig

    known = CLIPTextConfig().to_dict()
    for name, value in options.items():
        if name not in known or name in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"):
            raise ValueError(f"clip_config.{name}: not a CLIPTextConfig size or option "
                             f"(e.g. {', '.join(TINY_CLIP_DEFAULTS)}; the token ids come from the tokenizer)")
        if name in _CLIP_SIZES:
            check_int(f"clip_config.{name}", value, low=1)
    try:
        return CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **options)
    except Exception as error:  # transformers' own field checks raise their own exception types
        raise ValueError(f"clip_config: {error}") from error

