"""Text encoding with T5 (Imagen, Saharia et al. 2022: a frozen T5-XXL encoder).

``T5TextEncoder`` wraps transformers' ``T5EncoderModel`` and its tokenizer. transformers is imported inside
the class only, so ``import imagen_lib`` stays light and offline. Any T5 family checkpoint works by hub name or
local folder (T5, T5 v1.1, Flan-T5, UMT5, ByT5); nothing is downloaded unless the name is not a local folder
and the Hugging Face cache lacks it.

For quick experiments with no pretrained weights, :meth:`T5TextEncoder.build_tiny` builds a small randomly
initialised T5 with the byte-level ByT5 tokenizer (which needs no vocabulary file) or, given a word list, a
word-level tokenizer over those words, saves both with ``save_pretrained`` and loads them back through the
same ``from_pretrained`` path a real T5 takes.

Why a word-level option: a random T5 reading bytes hands the U-Net each word smeared over several tokens,
and a CPU-sized cascade trained for minutes learns almost nothing from it (on the shapes data, after 200
base steps a wrong caption's denoising error was within 2% of the right caption's; with one frozen token
per word it was 2.7 times as large: ``benchmarks/text_signal.py``). A pretrained T5 needs neither.
"""

from __future__ import annotations

import inspect
import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from imagen_lib.text_common import PretrainedTextEncoder, build_random_and_reload, quiet_transformers, resolve_dtype
from imagen_lib.validation import check_int, check_texts, typechecked

# the special tokens of a word-level vocabulary, with T5's ids (pad 0, end of sequence 1, unknown 2)
WORD_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")

# The default tiny encoder: small enough to train jointly with a CPU cascade in minutes.
TINY_T5_DEFAULTS = {"d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_heads": 4, "dropout_rate": 0.0}


class T5TextEncoder(PretrainedTextEncoder):
    """A T5 encoder that turns captions into ``(embeds, mask)``.

    Args:
        name_or_path: a hub name (``"google/t5-v1_1-xxl"``, Imagen's choice) or a local folder holding a
            ``T5EncoderModel`` (or full T5) and its tokenizer.
        max_length: tokens kept per caption, default 128 (NeMo's ``token_length``; Imagen used 128). Captions
            are always padded to ``max_length`` so an embedding never depends on its batch.
        dtype: weights' dtype (``torch.float32`` default; ``"bfloat16"`` halves a large T5's memory).
        device: where the encoder lives (default CPU; :class:`~imagen_lib.cascade.Cascade` moves it with
            itself).
        trainable: False (default, Imagen: frozen, eval mode, no gradients); True trains it jointly with
            the cascade (then its weights are saved in checkpoints).
        source: how this encoder was obtained, stored in :attr:`config` (set by :meth:`build_tiny`).

    ``encode(texts)`` returns ``embeds`` (B, max_length, embed_dim) with padded positions set to exactly
    0 and ``mask`` (B, max_length) bool, True for real tokens (the end-of-sequence token included).
    """

    kind = "t5"

    def __init__(
        self, name_or_path: Union[str, Path], max_length: int = 128,
        dtype: Union[None, str, torch.dtype] = None, device: Union[None, str, torch.device] = None,
        trainable: bool = False, source: Optional[dict] = None,
    ):
        super().__init__()
        from transformers import AutoTokenizer, T5EncoderModel  # lazy: transformers is heavy

        max_length = check_int("max_length", max_length, low=1)
        self.name_or_path, self.max_length, self.trainable = str(name_or_path), int(max_length), bool(trainable)
        self.source = dict(source) if source is not None else {"name_or_path": self.name_or_path}
        self._warned_words: set[str] = set()  # unknown words already warned about (tokenize)
        torch_dtype = resolve_dtype(dtype)
        kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
        with quiet_transformers():
            self.tokenizer = AutoTokenizer.from_pretrained(self.name_or_path)
            self.model = T5EncoderModel.from_pretrained(self.name_or_path, **kwargs)
        if device is not None:
            self.model.to(device)
        self.set_trainable(self.trainable)

    # ----------------------------------------------------------------------------------------------------

    @classmethod
    def build_tiny(
        cls, folder: Union[None, str, Path] = None, *, seed: int = 0, max_length: int = 64,
        trainable: bool = False, vocabulary: Optional[Sequence[str]] = None, **t5_config: Any,
    ) -> "T5TextEncoder":
        """A small randomly initialised T5, for quickstarts and tests.

        The tokenizer is ByT5's (bytes) when ``vocabulary`` is None, else a word-level one over those words
        (lower-cased; words and punctuation split as ``\\w+|[^\\w\\s]+``; anything else is ``<unk>``).
        The model is built from ``T5Config(vocab_size=..., **TINY_T5_DEFAULTS | t5_config)`` with weights
        drawn under ``seed`` (same seed, same weights on every process), saved with ``save_pretrained`` into
        ``folder`` (a temporary folder, removed after loading, when None) and loaded back from there.
        """
        from transformers import ByT5Tokenizer, T5EncoderModel

        seed, max_length = check_int("seed", seed), check_int("max_length", max_length, low=1)
        options = {**TINY_T5_DEFAULTS, **t5_config}
        tokenizer = ByT5Tokenizer() if vocabulary is None else word_tokenizer(vocabulary)
        source = {"build_tiny": options, "seed": int(seed)}
        if vocabulary is not None:
            source["vocabulary"] = list(vocabulary)
        return build_random_and_reload(
            T5EncoderModel, _tiny_t5_config(tokenizer, options), tokenizer, seed=seed, folder=folder,
            prefix="imagen_lib_t5_", load=lambda target: cls(target, max_length=max_length, trainable=trainable,
                                                             source=source))

    @property
    def embed_dim(self) -> int:
        """Width of each token embedding (``d_model``; 4096 for T5-XXL)."""
        return int(self.model.config.d_model)

    @property
    def config(self) -> dict:
        """Plain JSON values describing this encoder (stored in checkpoints)."""
        return {"kind": self.kind, "source": dict(self.source), "max_length": self.max_length,
                "trainable": self.trainable}

    # ----------------------------------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Token ids and bool mask (B, max_length) on the encoder's device, for a non-empty list of strings."""
        texts = check_texts("texts", texts)
        tokens = self.tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        unk = self.tokenizer.unk_token_id
        if unk is not None and bool((tokens.input_ids == unk).any()):  # cheap: ids still on the CPU
            self._warn_unknown(texts)
        return tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device).bool()

    # ----------------------------------------------------------------------------------------------------
    # vocabulary coverage (word-level tokenizers)
    # ----------------------------------------------------------------------------------------------------

    @property
    def word_vocabulary(self) -> Optional[dict[str, int]]:
        """``{word: id}`` of a word-level tokenizer (:func:`word_tokenizer`), None for any other."""
        from tokenizers import models

        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None or not isinstance(backend.model, models.WordLevel):
            return None
        return dict(backend.get_vocab(with_added_tokens=False))

    def unknown_words(self, texts: Sequence[str]) -> list[str]:
        """The distinct words of ``texts`` the tokenizer maps to its unknown token, in order of appearance."""
        texts = check_texts("texts", texts)
        unk, found = self.tokenizer.unk_token_id, {}
        if unk is None:
            return []
        for text in texts:
            if self.tokenizer.is_fast:
                tokens = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
                pieces = [text[a:b] for i, (a, b) in zip(tokens.input_ids, tokens.offset_mapping) if i == unk]
            else:
                pieces = [w for w in text.split() if unk in self.tokenizer(w, add_special_tokens=False).input_ids]
            found.update(dict.fromkeys(p.lower() for p in pieces))
        return list(found)

    def _warn_unknown(self, texts: Sequence[str]) -> None:
        """One warning per set of unknown words not warned about before (a training loop sees them every step)."""
        new = [w for w in self.unknown_words(texts) if w not in self._warned_words]
        if new:
            self._warned_words.update(new)
            hint = (" (extend_vocabulary adds them, e.g. examples/finetune.py does)" if self.word_vocabulary is not None
                    else "")
            warnings.warn(f"texts: the text encoder's tokenizer does not know {new}; they are read as "
                          f"{self.tokenizer.unk_token!r}, all alike{hint}", stacklevel=3)

    def extend_vocabulary(self, words: Sequence[str]) -> list[str]:
        """Add ``words`` (lower-cased) to a word-level tokenizer, each with a new row in the T5 embedding table
        initialised to the mean of the existing rows; returns the words that were new, in order. Existing words
        keep their ids and embeddings bit for bit. Both are saved by :meth:`save_pretrained` (so with a
        checkpoint), and ``config['source']['added_words']`` records them for a rebuild from the source."""
        vocab = self.word_vocabulary
        if vocab is None:
            raise ValueError(f"words: only a word-level tokenizer (build_tiny(vocabulary=...)) can be extended; "
                             f"this encoder's is {type(self.tokenizer).__name__}")
        if isinstance(words, str) or not isinstance(words, Sequence) or not all(isinstance(w, str) for w in words):
            raise ValueError(f"words: expected a list of words, got {words!r}")
        splitter = self.tokenizer.backend_tokenizer.pre_tokenizer
        for word in words:
            if [piece for piece, _ in splitter.pre_tokenize_str(word.lower())] != [word.lower()]:
                raise ValueError(f"words: {word!r} is not one word to this tokenizer (\\w+ or punctuation)")
        new = [w for w in dict.fromkeys(w.lower() for w in words) if w not in vocab]
        if new:
            table = self.model.get_input_embeddings()
            rows = table.weight.shape[0]
            vocab.update({w: rows + i for i, w in enumerate(new)})
            self.tokenizer = _word_level_tokenizer(vocab)
            self.model.set_input_embeddings(_extended_table(table, len(new), self.trainable))
            self.model.config.vocab_size = rows + len(new)
            self.source["added_words"] = [*self.source.get("added_words", []), *new]
        return new

    @typechecked
    def encode(self, texts: Sequence[str], model: Optional[nn.Module] = None) -> tuple[Tensor, Tensor]:
        """``(embeds, mask)`` for a list of captions, encoded as one batch.

        ``embeds`` (B, max_length, embed_dim) float on the encoder's device, zero at padded positions;
        ``mask`` (B, max_length) bool, True = real token. Gradients flow only when ``trainable``.
        ``model``: another copy of this encoder's T5 model to encode with (e.g. the trainer's EMA copy), run
        in eval mode (no dropout) and without gradients [None: this encoder's own model].
        """
        ids, mask = self.tokenize(texts)
        if model is None:
            with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
                hidden = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        else:
            hidden = _run_in_eval_mode(model, ids, mask)
        embeds = hidden * mask.unsqueeze(-1).to(hidden.dtype)  # padded positions exactly 0
        return embeds, mask

    def forward(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Same as :meth:`encode` (so a distributed wrapper sees the call)."""
        return self.encode(texts)

    def __repr__(self) -> str:
        return (f"T5TextEncoder({self.name_or_path!r}, max_length={self.max_length}, "
                f"embed_dim={self.embed_dim}, trainable={self.trainable})")


# T5Config fields that count something: a zero or negative value builds no model
_T5_SIZES = ("d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets",
             "relative_attention_max_distance")


def _tiny_t5_config(tokenizer, options: dict):
    """The ``T5Config`` of :meth:`T5TextEncoder.build_tiny`, its options checked: known fields only, sizes >= 1
    (errors name the field as ``t5_config.NAME``)."""
    from transformers import T5Config

    known = T5Config().to_dict()
    for name, value in options.items():
        if name not in known:
            raise ValueError(f"t5_config.{name}: not a T5Config field (e.g. {', '.join(TINY_T5_DEFAULTS)})")
        if name in _T5_SIZES:
            check_int(f"t5_config.{name}", value, low=1)
    try:
        return T5Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id, **options)
    except Exception as error:  # transformers' own field checks raise their own exception types
        raise ValueError(f"t5_config: {error}") from error


@torch.no_grad()
def _run_in_eval_mode(model: nn.Module, ids: Tensor, mask: Tensor) -> Tensor:
    was_training = model.training
    model.eval()
    try:
        return model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    finally:
        model.train(was_training)


def _extended_table(table: nn.Embedding, count: int, trainable: bool) -> nn.Embedding:
    """``table`` with ``count`` more rows, each the mean of the existing ones (old rows copied exactly)."""
    old = table.weight.detach()
    mean = old.float().mean(0).to(old.dtype)
    weight = torch.cat([old, mean.expand(count, -1)])
    extended = nn.Embedding(weight.shape[0], weight.shape[1], device=old.device, dtype=old.dtype)
    with torch.no_grad():
        extended.weight.copy_(weight)
    return extended.requires_grad_(trainable)


def word_tokenizer(vocabulary: Sequence[str]):
    """A word-level ``PreTrainedTokenizerFast`` over ``vocabulary`` with T5's special tokens and a closing
    ``</s>``, saved and loaded like any Hugging Face tokenizer (``tokenizer.json``). A word outside it is read
    as ``<unk>``; :meth:`T5TextEncoder.tokenize` warns about such words and :meth:`T5TextEncoder.extend_vocabulary`
    adds them."""
    if isinstance(vocabulary, str) or not vocabulary or not all(isinstance(w, str) and w for w in vocabulary):
        raise ValueError(f"vocabulary: expected a non-empty list of words, got {vocabulary!r}")
    words = [*WORD_SPECIAL_TOKENS, *sorted({w.lower() for w in vocabulary} - set(WORD_SPECIAL_TOKENS))]
    return _word_level_tokenizer({w: i for i, w in enumerate(words)})


def _word_level_tokenizer(vocab: dict[str, int]):
    """The tokenizer of :func:`word_tokenizer` over the given ``{word: id}`` (special tokens at T5's ids)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(dict(vocab), unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def text_encoder_from_config(config: dict, folder: Union[None, str, Path] = None) -> Any:
    """Rebuild an encoder from its ``config`` (:attr:`T5TextEncoder.config`, :attr:`CLIPTextEncoder.config
    <imagen_lib.text_clip.CLIPTextEncoder.config>`): the class is the one :data:`TEXT_ENCODERS` names by the
    config's ``kind`` (default ``"t5"``: configs written before kinds existed), its other keys are the class's
    arguments.

    ``folder``: a local folder with saved weights (a checkpoint's copy) that takes precedence over the
    source; otherwise a ``build_tiny`` source is rebuilt from its seed and a ``name_or_path`` is loaded.
    """
    if not isinstance(config, dict) or "source" not in config:
        raise ValueError(f"config: expected a text encoder's config dict with a 'source', got {config!r}")
    cls = text_encoder_class(config.get("kind", "t5"))
    source = dict(config["source"])
    common = {k: v for k, v in config.items() if k not in ("kind", "source")}
    if folder is not None:
        return cls(folder, source=source, **common)
    if "build_tiny" in source:
        encoder = cls.build_tiny(seed=source.get("seed", 0), vocabulary=source.get("vocabulary"), **common,
                                 **source["build_tiny"])
        if source.get("added_words"):  # the architecture of the extended vocabulary (weights: the checkpoint's)
            encoder.extend_vocabulary(source["added_words"])
        return encoder
    if "name_or_path" in source:
        return cls(source["name_or_path"], **common)
    raise ValueError(f"config['source']: expected 'build_tiny' or 'name_or_path', got {sorted(source)}")


# ---------------------------------------------------------------------------------------------------------
# text-encoder kinds: one table, one builder (config blocks, checkpoints and commands all go through it)
# ---------------------------------------------------------------------------------------------------------


def _clip_encoder() -> type:
    from imagen_lib.text_clip import CLIPTextEncoder  # lazy: only a clip encoder needs its module

    return CLIPTextEncoder


TEXT_ENCODERS: dict[str, Callable[[], type]] = {"t5": lambda: T5TextEncoder, "clip": _clip_encoder}
"""Text-encoder kinds, each mapped to a function returning its class (so a kind's module is imported only when
it is used). Every class is built as ``cls(name_or_path, **options)`` or ``cls.build_tiny(seed=..,
vocabulary=.., **options)`` and has ``kind``, ``config`` and ``save_pretrained``; :func:`register_text_encoder`
adds your own."""

# transformers' model_type -> kind, for a folder or hub name given without a kind
MODEL_TYPE_KINDS = {"t5": "t5", "mt5": "t5", "umt5": "t5", "clip": "clip", "clip_text_model": "clip"}


def register_text_encoder(cls: type, kind: Optional[str] = None) -> type:
    """Let configs and checkpoints build encoders of class ``cls`` by ``kind`` (default ``cls.kind``); returns
    ``cls``, so it also works as a class decorator. Its ``config`` must then hold ``"kind": kind``."""
    if not isinstance(cls, type):
        raise TypeError(f"cls: expected a class, got {type(cls).__name__}")
    kind = getattr(cls, "kind", None) if kind is None else kind
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"kind: expected a non-empty name (or a class with a 'kind' attribute), got {kind!r}")
    if kind in TEXT_ENCODERS and TEXT_ENCODERS[kind]() is not cls:
        raise ValueError(f"kind: {kind!r} already names {TEXT_ENCODERS[kind]().__qualname__}; choose another name")
    TEXT_ENCODERS[kind] = lambda: cls
    return cls


def text_encoder_class(kind: str) -> type:
    """The encoder class of ``kind`` (a key of :data:`TEXT_ENCODERS`)."""
    if kind not in TEXT_ENCODERS:
        raise ValueError(f"kind: expected a text encoder kind, one of {sorted(TEXT_ENCODERS)}, got {kind!r}")
    return TEXT_ENCODERS[kind]()


def infer_text_encoder_kind(name_or_path: Union[str, Path]) -> str:
    """The kind of the encoder saved at ``name_or_path``, from its ``config.json``'s ``model_type`` (a local
    folder, its ``text_encoder/`` in a Stable Diffusion pipeline folder, or a hub name through
    ``transformers.AutoConfig``)."""
    root = Path(name_or_path)
    files = [f for f in (root / "config.json", root / "text_encoder" / "config.json") if f.is_file()]
    if files:
        model_type = json.loads(files[0].read_text(encoding="utf-8")).get("model_type")
    elif root.is_dir():
        raise ValueError(f"name_or_path: {name_or_path} holds no config.json; is it a saved text encoder?")
    else:
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(str(name_or_path)).model_type
    if model_type not in MODEL_TYPE_KINDS:
        raise ValueError(f"name_or_path: {name_or_path} holds a {model_type!r} model, not one of the text encoders "
                         f"{sorted(MODEL_TYPE_KINDS)}; pass its kind (one of {sorted(TEXT_ENCODERS)}) to choose")
    return MODEL_TYPE_KINDS[model_type]


def load_text_encoder(name_or_path: Union[str, Path], kind: Optional[str] = None, **options: Any) -> Any:
    """The encoder saved at ``name_or_path`` (a hub name or local folder), built by the class of ``kind``
    [None: :func:`infer_text_encoder_kind`] with ``options`` (its arguments: ``max_length``, ``dtype``,
    ``device``, ``trainable``, ``layer`` for CLIP, ...; a None value leaves the class's default). An option
    the class does not take is an error that names it."""
    kind = infer_text_encoder_kind(name_or_path) if kind is None else kind
    cls = text_encoder_class(kind)
    options = {name: value for name, value in options.items() if value is not None}
    parameters = inspect.signature(cls.__init__).parameters
    accepted = set(parameters) - {"self", "name_or_path"}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())  # a wrapper passes everything on
    for name in options:
        if name not in accepted and not takes_any:
            raise ValueError(f"{name}: not an option of a {kind!r} text encoder ({cls.__name__}: "
                             f"{', '.join(sorted(accepted))})")
    return cls(name_or_path, **options)
