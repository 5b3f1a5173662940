"""Text towers: embed prompts into the foundation's joint image-text space.

Two kinds, one interface (`TextTower(prompts) -> (B, proj_dim)`):

- "bert": the published tower. A `transformers` BertModel whose sizes are read from the
  checkpoint's `text_encoder.*` shapes, a WordPiece tokenizer from a `vocab.txt` the user
  names (the published files carry no vocabulary), mean pooling over the tokens, then
  `proj` = Linear(hidden, P) -> ReLU -> Linear(P, P) -> LayerNorm(P), the published
  `text_proj` layout. `transformers` is an optional extra (`napari-lsmfm[text]`).
- "lsmfm": our own small offline tower for pretraining: a word or character-trigram
  tokenizer whose vocabulary lives in the config, token + position embeddings, a few
  transformer layers (or none: mean-pooled embeddings), mean pooling, the same `proj`.
"""

from __future__ import annotations

import inspect
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

TEXT_KINDS = ("bert", "lsmfm")
SPECIAL_TOKENS = ("[PAD]", "[UNK]")
BERT_HEAD_SIZE = 64  # every released BERT (tiny to large) uses 64-dimensional heads
INSTALL_HINT = "install the optional extra: pip install 'napari-lsmfm[text]'"
VOCAB_HINT = (
    "point to BERT-base-uncased's vocab.txt with --vocab (Python: vocab=...); "
    "the published checkpoint carries the BERT weights but not its WordPiece vocabulary"
)

_WORD = re.compile(r"[a-z0-9]+")
_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.")


class TextTowerUnavailable(RuntimeError):
    """The text tower cannot be built here; the message says what is missing and what to do."""


def _import_transformers():
    try:
        import transformers
    except ImportError as err:
        raise TextTowerUnavailable(
            f"The BERT text tower needs the package transformers, which is not installed: "
            f"{INSTALL_HINT}."
        ) from err
    return transformers


def projection(width: int, proj_dim: int) -> nn.Sequential:
    """The published projection head: Linear -> ReLU -> Linear -> LayerNorm."""
    return nn.Sequential(
        nn.Linear(width, proj_dim), nn.ReLU(), nn.Linear(proj_dim, proj_dim), nn.LayerNorm(proj_dim)
    )


def _masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


# --- "bert": the published tower -------------------------------------------------------


def bert_config_from_state(
    text_state: Mapping[str, torch.Tensor], *, proj_dim: int, name: str | None = None
) -> dict:
    """The "bert" text config implied by BertModel weights (keys without `text_encoder.`).

    Sizes come from the shapes; the head count from BERT's 64-dimensional heads.
    Raises ValueError naming the missing key when the layout is not BERT's.
    """
    try:
        vocab_size, hidden = text_state["embeddings.word_embeddings.weight"].shape
        max_positions = text_state["embeddings.position_embeddings.weight"].shape[0]
        type_vocab = text_state["embeddings.token_type_embeddings.weight"].shape[0]
        intermediate = text_state["encoder.layer.0.intermediate.dense.weight"].shape[0]
    except KeyError as err:
        raise ValueError(f"text_encoder.* is not a BERT layout (no {err.args[0]})") from None
    layers = 1 + max(int(m.group(1)) for k in text_state if (m := _LAYER.match(k)))
    heads = hidden // BERT_HEAD_SIZE if hidden % BERT_HEAD_SIZE == 0 else 1
    # bert-base-uncased (the published model) lower-cases; a "cased" model would not.
    lower = not (name and "uncased" not in name.lower() and "cased" in name.lower())
    return {
        "kind": "bert",
        "vocab_size": int(vocab_size),
        "hidden_size": int(hidden),
        "num_hidden_layers": int(layers),
        "num_attention_heads": int(heads),
        "intermediate_size": int(intermediate),
        "max_position_embeddings": int(max_positions),
        "type_vocab_size": int(type_vocab),
        "layer_norm_eps": 1e-12,
        "hidden_act": "gelu",
        "pooler": "pooler.dense.weight" in text_state,
        "do_lower_case": bool(lower),
        "proj_dim": int(proj_dim),
        "name": name,
    }


def read_wordpiece_vocab(path: str | Path) -> list[str]:
    """Tokens of a BERT `vocab.txt`, one per line, in id order."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TextTowerUnavailable(f"The vocabulary file {path} does not exist; {VOCAB_HINT}.")
    try:
        tokens = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as err:
        raise TextTowerUnavailable(
            f"The vocabulary file {path} could not be read as UTF-8 text ({err}); {VOCAB_HINT}."
        ) from err
    if tokens and tokens[-1] == "":
        tokens.pop()
    missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]") if t not in tokens]
    if missing:
        raise TextTowerUnavailable(
            f"{path} is not a BERT WordPiece vocabulary (no {', '.join(missing)}); {VOCAB_HINT}."
        )
    return tokens


class _BertTokenizer:
    """A `transformers` BertTokenizer built from a token list (no files fetched)."""

    def __init__(self, tokens: list[str], *, lower: bool, max_length: int, vocab_path: Path):
        transformers = _import_transformers()
        cls = transformers.BertTokenizer
        params = inspect.signature(cls.__init__).parameters
        if "vocab_file" in params:  # transformers 4
            self._tok = cls(vocab_file=str(vocab_path), do_lower_case=lower)
        else:  # transformers 5 takes the vocabulary itself
            self._tok = cls(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=lower)
        self.max_length = max_length

    def __call__(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        out = self._tok(
            prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {k: out[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in out}


def _build_bert(cfg: Mapping[str, Any]) -> nn.Module:
    transformers = _import_transformers()
    config = transformers.BertConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        intermediate_size=cfg["intermediate_size"],
        max_position_embeddings=cfg["max_position_embeddings"],
        type_vocab_size=cfg["type_vocab_size"],
        layer_norm_eps=cfg.get("layer_norm_eps", 1e-12),
        hidden_act=cfg.get("hidden_act", "gelu"),
    )
    return transformers.BertModel(config, add_pooling_layer=bool(cfg.get("pooler", True)))


# --- "lsmfm": our own small tower -----------------------------------------------------


def tokenize_words(text: str, tokenizer: str = "word") -> list[str]:
    """Lower-cased word tokens, or the character trigrams of each word ("#dapi#" -> #da dap...)."""
    words = _WORD.findall(text.lower())
    if tokenizer == "word":
        return words
    if tokenizer == "trigram":
        grams = []
        for word in words:
            padded = f"#{word}#"
            grams += [padded[i : i + 3] for i in range(len(padded) - 2)]
        return grams
    raise ValueError(f"Unknown tokenizer {tokenizer!r}; expected 'word' or 'trigram'.")


def build_vocab(
    texts: Iterable[str],
    *,
    tokenizer: str = "word",
    min_count: int = 1,
    max_size: int | None = None,
) -> list[str]:
    """A vocabulary for the "lsmfm" tower from captions: [PAD], [UNK], then tokens by frequency."""
    counts = Counter(t for text in texts for t in tokenize_words(text, tokenizer))
    ranked = sorted((t for t, n in counts.items() if n >= min_count), key=lambda t: (-counts[t], t))
    if max_size is not None:
        ranked = ranked[: max(0, max_size - len(SPECIAL_TOKENS))]
    return list(SPECIAL_TOKENS) + [t for t in ranked if t not in SPECIAL_TOKENS]


class _VocabTokenizer:
    """Word or trigram tokens -> ids from a stored vocabulary; unknown tokens -> [UNK]."""

    def __init__(self, vocab: Sequence[str], *, tokenizer: str, max_length: int):
        if list(vocab[: len(SPECIAL_TOKENS)]) != list(SPECIAL_TOKENS):
            raise ValueError(f"the vocabulary must start with {list(SPECIAL_TOKENS)}")
        self.index = {t: i for i, t in enumerate(vocab)}
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        unk = self.index["[UNK]"]
        rows = []
        for text in prompts:
            ids = [self.index.get(t, unk) for t in tokenize_words(text, self.tokenizer)]
            rows.append(ids[: self.max_length] or [unk])  # an empty prompt still has one token
        width = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask}


class SmallTextEncoder(nn.Module):
    """Token + position embeddings, a few pre-norm transformer layers: (B, L) -> (B, L, width)."""

    def __init__(
        self, vocab_size: int, width: int, layers: int, heads: int, max_length: int, dropout: float
    ):
        super().__init__()
        self.token = nn.Embedding(vocab_size, width, padding_idx=0)
        self.position = nn.Embedding(max_length, width)
        self.layers = None
        if layers > 0:
            layer = nn.TransformerEncoderLayer(
                width, heads, 4 * width, dropout, batch_first=True, norm_first=True
            )
            self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.token(input_ids) + self.position(positions)[None]
        if self.layers is not None:
            x = self.layers(x, src_key_padding_mask=attention_mask == 0)
        return self.norm(x)


# --- the tower ----------------------------------------------------------------------------


class TextTower(nn.Module):
    """Prompts -> (B, proj_dim) embeddings (not normalised; `Foundation.embed_text` does that).

    Parameters live in `encoder` (BertModel or SmallTextEncoder) and `proj` (the published
    text_proj layout). Build one with `TextTower.from_config` or `build_lsmfm_text_tower`.
    """

    def __init__(
        self, cfg: Mapping[str, Any], encoder: nn.Module, tokenizer: Any, vocab: list[str]
    ):
        super().__init__()
        self.kind: str = cfg["kind"]
        self.proj_dim = int(cfg["proj_dim"])
        self.width = int(cfg["hidden_size"] if self.kind == "bert" else cfg["width"])
        self._config = dict(cfg)
        self.encoder = encoder
        self.proj = projection(self.width, self.proj_dim)
        self.tokenizer = tokenizer
        self.vocabulary = vocab

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], *, vocab: str | Path | None = None) -> TextTower:
        """Build an untrained tower from a text config (`FoundationSpec.text`).

        "bert" needs `transformers` and `vocab` (a BERT vocab.txt); without them it raises
        TextTowerUnavailable saying which is missing. "lsmfm" needs nothing else.
        """
        kind = cfg.get("kind")
        if kind == "lsmfm":
            words = list(cfg["vocab"])
            tokenizer = _VocabTokenizer(
                words, tokenizer=cfg.get("tokenizer", "word"), max_length=int(cfg["max_length"])
            )
            encoder = SmallTextEncoder(
                len(words),
                int(cfg["width"]),
                int(cfg.get("layers", 2)),
                int(cfg.get("heads", 4)),
                int(cfg["max_length"]),
                float(cfg.get("dropout", 0.0)),
            )
            return cls(cfg, encoder, tokenizer, words)
        if kind == "bert":
            problems = []
            try:
                _import_transformers()
            except TextTowerUnavailable:
                problems.append(f"the package transformers is not installed ({INSTALL_HINT})")
            if vocab is None:
                problems.append(
                    "no WordPiece vocabulary was given (point to BERT-base-uncased's vocab.txt "
                    "with --vocab; Python: vocab=...)"
                )
            if problems:
                raise TextTowerUnavailable(
                    "The checkpoint's BERT text tower is unavailable: "
                    + "; and ".join(problems)
                    + "."
                )
            tokens = read_wordpiece_vocab(vocab)
            if len(tokens) != int(cfg["vocab_size"]):
                raise TextTowerUnavailable(
                    f"The vocabulary {vocab} has {len(tokens)} tokens but the text tower's "
                    f"embedding has {cfg['vocab_size']} rows; name the vocab.txt of the BERT the "
                    f"checkpoint was trained from (bert-base-uncased: 30522 tokens)."
                )
            tokenizer = _BertTokenizer(
                tokens,
                lower=bool(cfg.get("do_lower_case", True)),
                max_length=int(cfg["max_position_embeddings"]),
                vocab_path=Path(vocab).expanduser(),
            )
            return cls(cfg, _build_bert(cfg), tokenizer, tokens)
        raise ValueError(f"Unknown text tower kind {kind!r}; expected one of {TEXT_KINDS}.")

    def config(self) -> dict:
        """The JSON-ready config this tower was built from ("lsmfm" ones hold their vocabulary)."""
        return dict(self._config)

    def tokenize(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids and attention mask (B, L) on the tower's device."""
        device = self.proj[0].weight.device
        return {k: v.to(device) for k, v in self.tokenizer(list(prompts)).items()}

    def forward(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B,) prompts -> (B, proj_dim) float embeddings (mean over tokens, then proj)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if len(prompts) == 0:
            raise ValueError("No prompts to embed: pass at least one string.")
        tokens = self.tokenize(prompts)
        if self.kind == "bert":
            hidden = self.encoder(**tokens).last_hidden_state
        else:
            hidden = self.encoder(tokens["input_ids"], tokens["attention_mask"])
        # The published code averages all positions; masking the padding gives the same
        # value for a prompt embedded alone and makes a batch independent of its padding.
        return self.proj(_masked_mean(hidden, tokens["attention_mask"]))


def build_lsmfm_text_tower(
    vocab: Sequence[str],
    proj_dim: int,
    *,
    width: int = 128,
    layers: int = 2,
    heads: int = 4,
    max_length: int = 64,
    tokenizer: str = "word",
    dropout: float = 0.0,
) -> TextTower:
    """Our own small text tower, untrained, for pretraining (see `build_vocab`).

    `vocab` is stored in the config (so in config.json); [PAD] and [UNK] are put first
    when missing. `layers=0` gives mean-pooled embeddings followed by the projection MLP.
    """
    words = list(vocab)
    if words[: len(SPECIAL_TOKENS)] != list(SPECIAL_TOKENS):
        words = list(SPECIAL_TOKENS) + [w for w in words if w not in SPECIAL_TOKENS]
    if width % heads:
        raise ValueError(f"width {width} must be a multiple of heads {heads}")
    tokenize_words("", tokenizer)  # validates the tokenizer name
    cfg = {
        "kind": "lsmfm",
        "tokenizer": tokenizer,
        "vocab": words,
        "width": int(width),
        "layers": int(layers),
        "heads": int(heads),
        "max_length": int(max_length),
        "dropout": float(dropout),
        "proj_dim": int(proj_dim),
    }
    return TextTower.from_config(cfg)
