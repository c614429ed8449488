"""Learned tokens (textual inversion, pivotal tuning): new words in a pipeline's tokenizer(s) with their
own input embeddings in its text encoder(s), inserted and removed again exactly.

A token with n vectors is n tokenizer entries, `tok tok_1 ... tok_{n-1}`, named as diffusers' textual
inversion loader names them; diffusers pipelines expand `tok` in a prompt to all n
(`TextualInversionLoaderMixin.maybe_convert_prompt`, which every SD / SDXL `encode_prompt` calls).
Their ids follow the tokenizer's vocabulary: `first = len(tokenizer)`, `first + 1`, ...

Inserting swaps, per text encoder:
- the tokenizer for an extended copy (`copy.deepcopy`, then `add_tokens`); the original is kept aside.
  Copying CLIP's tokenizer costs about 0.2 s (rebuilding its BPE tables), so the last few copies are
  kept (`extended_tokenizer`) and reused when the same tokens go into the same tokenizer again
  (generation inserts an adapter's tokens at every call);
- the input embedding E (vocab, width) for `AddedTokens(E, first, vectors)`, which for input ids
  (batch, seq) returns

      out[b, s] = E[id]              if id <  first
                = V[id - first]      if id >= first        V (n_added, width): the tokens' vectors, stacked

  with one trainable parameter (n_vectors, width) per token and E itself untouched. Its `weight` is
  the resized table [E; V] (vocab + n_added, width), for code that reads it.
Removing puts both original objects back, so the tokenizer and the embedding module are the very ones
the pipeline had. Insertions stack (each wraps the embedding before it) and are removed last first.

A token initialised from a word: vector i = the embedding of the word's piece i mod (number of its
pieces), as kohya sd-scripts' train_textual_inversion.py initialises (a one-piece word: every vector).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import UserError
from .io import TEXT_PARTS
from .parts import TOKENIZERS, part_model, text_parts

TokenVectors = Mapping[str, Mapping[str, torch.Tensor]]  # text part -> token -> (n_vectors, width)
TOKENIZER_CACHE_SIZE = 4  # extended tokenizer copies kept: a few adapters' tokens in SDXL's two tokenizers
_tokenizer_cache: OrderedDict[tuple, tuple[Any, Any]] = OrderedDict()  # key -> (original, extended copy)


class AddedTokens(nn.Module):
    """A text encoder's input embedding with tokens added: ids from `first` on read the tokens' vectors."""

    def __init__(self, base: nn.Module, first: int, vectors: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self.base = base  # the embedding before (an nn.Embedding, or the AddedTokens of an earlier insertion)
        self.first = first
        device = base.weight.device
        self.vectors = nn.ParameterList([nn.Parameter(v.detach().to(device, torch.float32).clone()) for v in vectors])

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    @property
    def num_embeddings(self) -> int:
        return self.first + sum(v.shape[0] for v in self.vectors)

    @property
    def weight(self) -> torch.Tensor:
        """The resized table [E; V] (num_embeddings, width)."""
        base = self.base.weight
        return torch.cat([base, torch.cat(list(self.vectors)).to(base.dtype)])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        added = ids >= self.first  # (batch, seq)
        out = self.base(ids.masked_fill(added, 0))  # (batch, seq, width)
        table = torch.cat(list(self.vectors)).to(out.dtype)  # (n_added, width)
        rows = nn.functional.embedding((ids - self.first).clamp(min=0), table)  # (batch, seq, width)
        return torch.where(added.unsqueeze(-1), rows, out)


@dataclass
class _Insertion:
    """What inserting tokens changed in one text part, and what puts it back."""

    tokenizer_attr: str
    tokenizer: Any  # the pipeline's tokenizer before
    extended: Any  # the copy with the tokens added, the pipeline's tokenizer until removal
    encoder: nn.Module
    embedding: nn.Module  # the input embedding before
    module: AddedTokens
    tokens: list[str]


class Tokens:
    """Tokens inserted into a pipeline: their trainable vectors, and `remove()` to take them out."""

    def __init__(self, pipe: Any, insertions: dict[str, _Insertion]) -> None:
        self.pipe, self.insertions = pipe, insertions
        self.removed = False

    @property
    def tokens(self) -> list[str]:
        """Every token inserted, each once, in insertion order."""
        return list(dict.fromkeys(token for insertion in self.insertions.values() for token in insertion.tokens))

    def named_parameters(self) -> Iterator[tuple[str, str, nn.Parameter]]:
        """(text part, token, its vectors (n_vectors, width)) for each token of each text encoder."""
        for part, insertion in self.insertions.items():
            for token, param in zip(insertion.tokens, insertion.module.vectors):
                yield part, token, param

    def parameters(self) -> list[nn.Parameter]:
        return [param for _, _, param in self.named_parameters()]

    @property
    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def vectors(self) -> dict[str, dict[str, torch.Tensor]]:
        """text part -> token -> its vectors (n_vectors, width), float32, detached."""
        found: dict[str, dict[str, torch.Tensor]] = {}
        for part, token, param in self.named_parameters():
            found.setdefault(part, {})[token] = param.detach().clone()
        return found

    def remove(self) -> None:
        """Put the tokenizer(s) and input embedding(s) the pipeline had before back; a second call does nothing."""
        if self.removed:
            return
        for part, insertion in self.insertions.items():
            if (
                getattr(self.pipe, insertion.tokenizer_attr) is not insertion.extended
                or insertion.encoder.get_input_embeddings() is not insertion.module
            ):
                raise UserError(f"tokens inserted into {part} after {', '.join(insertion.tokens)} are still there; remove those first")
        for insertion in reversed(self.insertions.values()):
            setattr(self.pipe, insertion.tokenizer_attr, insertion.tokenizer)
            insertion.encoder.set_input_embeddings(insertion.embedding)
        self.removed = True


def pieces(token: str, count: int) -> list[str]:
    """The tokenizer entries of a token with `count` vectors: `tok tok_1 ... tok_{count-1}`."""
    return [token] + [f"{token}_{i}" for i in range(1, count)]


def insert_tokens(pipe: Any, vectors: TokenVectors) -> Tokens:
    """Insert `{text part: {token: vectors (n_vectors, width)}}` into `pipe` (see the module docstring).
    Everything is checked before the pipeline changes: a UserError leaves it as it was."""
    planned: dict[str, _Insertion] = {}
    for part, tokens in vectors.items():
        if part not in TEXT_PARTS:
            raise UserError(f"tokens go into a text encoder; '{part}' is not one (accepted: {', '.join(TEXT_PARTS)})")
        if tokens:
            planned[part] = _plan(pipe, part, tokens)
    for insertion in planned.values():
        setattr(pipe, insertion.tokenizer_attr, insertion.extended)
        insertion.encoder.set_input_embeddings(insertion.module)
    return Tokens(pipe, planned)


def _plan(pipe: Any, part: str, tokens: Mapping[str, torch.Tensor]) -> _Insertion:
    """The extended tokenizer copy and embedding of one text part, built and checked, not yet installed."""
    part_model(pipe, part)  # the pipeline has this text encoder, or a UserError
    encoder, attr = getattr(pipe, part), TOKENIZERS[part]
    tokenizer = getattr(pipe, attr, None)
    if tokenizer is None:
        raise UserError(f"this pipeline has no {attr} for {part}; tokens need one")
    embedding = encoder.get_input_embeddings()
    width, first = embedding.embedding_dim, len(tokenizer)
    if embedding.num_embeddings != first:
        raise UserError(f"the {attr} has {first} entries but the {part} embeds {embedding.num_embeddings}; tokens cannot be added to it")
    names: list[str] = []
    for token, value in tokens.items():
        if not isinstance(token, str) or not token or any(c.isspace() for c in token):
            raise UserError(f"token {token!r} must be a non-empty word without spaces, such as '<sks>'")
        if not isinstance(value, torch.Tensor) or value.dim() != 2 or value.shape[0] < 1 or value.shape[1] != width:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise UserError(f"the vectors of token '{token}' for {part} are {shape}; expected (n_vectors, {width})")
        if not bool(torch.isfinite(value).all()):
            raise UserError(f"the vectors of token '{token}' for {part} hold NaN or infinite values")
        for piece in pieces(token, value.shape[0]):
            if known(tokenizer, piece) or piece in names:
                raise UserError(f"'{piece}' is already a token of the {attr}; choose another token than '{token}'")
            names.append(piece)
    extended = extended_tokenizer(tokenizer, names)
    module = AddedTokens(embedding, first, list(tokens.values()))
    return _Insertion(attr, tokenizer, extended, encoder, embedding, module, list(tokens))


def extended_tokenizer(tokenizer: Any, names: list[str]) -> Any:
    """A copy of `tokenizer` with the entries `names` added (ids `len(tokenizer)` on), cached (module docstring)."""
    key = (id(tokenizer), len(tokenizer), tuple(names))
    cached = _tokenizer_cache.get(key)
    if cached is not None and cached[0] is tokenizer and len(cached[1]) == len(tokenizer) + len(names):
        _tokenizer_cache.move_to_end(key)
        return cached[1]
    extended = copy.deepcopy(tokenizer)
    extended.add_tokens(names)
    ids = extended.convert_tokens_to_ids(names)
    assert ids == list(range(len(tokenizer), len(tokenizer) + len(names))), f"added token ids {ids} do not follow the vocabulary"
    _tokenizer_cache[key] = (tokenizer, extended)  # holding the original keeps its id from being reused
    while len(_tokenizer_cache) > TOKENIZER_CACHE_SIZE:
        _tokenizer_cache.popitem(last=False)
    return extended


def known(tokenizer: Any, piece: str) -> bool:
    """Whether `piece` is already an entry of `tokenizer` (its vocabulary or tokens added to it)."""
    return piece == tokenizer.unk_token or tokenizer.convert_tokens_to_ids(piece) not in (None, tokenizer.unk_token_id)


def word_vectors(pipe: Any, part: str, word: str, num_vectors: int) -> torch.Tensor:
    """(num_vectors, width) initial vectors from `word` in text part `part` (module docstring)."""
    tokenizer, encoder = getattr(pipe, TOKENIZERS[part], None), getattr(pipe, part)
    ids = tokenizer(word, add_special_tokens=False).input_ids if tokenizer is not None and isinstance(word, str) else []
    if not ids:
        raise UserError(f"initialiser word {word!r} has no tokens in the {TOKENIZERS[part]}; give a word such as 'dog'")
    with torch.no_grad():
        table = encoder.get_input_embeddings().weight  # (vocab, width)
        return table[[ids[i % len(ids)] for i in range(num_vectors)]].float().clone()  # (num_vectors, width)


def new_tokens(pipe: Any, words: Mapping[str, str], num_vectors: int = 1, parts: Sequence[str] | None = None) -> Tokens:
    """Insert `{token: initialiser word}` into the text encoders `parts` of `pipe` (default: every one
    it has), each token with `num_vectors` vectors initialised from its word; ready to train."""
    if isinstance(num_vectors, bool) or not isinstance(num_vectors, int) or num_vectors < 1:
        raise UserError(f"num_vectors must be a positive integer, got {num_vectors!r}")
    chosen = text_parts(pipe) if parts is None else list(parts)
    if not chosen:
        raise UserError("this pipeline has no text encoder to add tokens to")
    for part in chosen:
        part_model(pipe, part)
    return insert_tokens(
        pipe, {part: {token: word_vectors(pipe, part, word, num_vectors) for token, word in words.items()} for part in chosen}
    )


@contextmanager
def tokens_inserted(pipe: Any, vectors: TokenVectors) -> Iterator[Tokens]:
    """Within the block the tokens are in `pipe`; after it, the tokenizer(s) and embedding(s) it had are back."""
    tokens = insert_tokens(pipe, vectors)
    try:
        yield tokens
    finally:
        tokens.remove()
