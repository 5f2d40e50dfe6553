"""Tokenizers: load a Fuyu tokenizer from a local model directory, or build the tiny offline one.

The tiny tokenizer exists so tests and the demo run with no download. It is shaped like adept/fuyu-8b's so that
transformers' own `FuyuProcessor` accepts it (the parity oracle):

- a `tokenizers` Unigram model with the `Metaspace(prepend_scheme="always")` pre-tokenizer;
- `|SPEAKER|`, `|NEWLINE|`, `▁` and the byte pieces `<0x00>`…`<0xFF>` are *ordinary* vocabulary entries: the
  processor tokenizes the placeholder string `|SPEAKER|…|NEWLINE|<s>` and drops its first token, expecting it to be
  the `▁` that Metaspace prepends (an added token would be split off first and break that);
- `<unk>`, `<s>` and `|ENDOFTEXT|` are special added tokens (ids 0, 1, 2, as in the real vocabulary's low ids);
- byte fallback is on, so any text (any Unicode) encodes without `<unk>` and decodes back unchanged.

Token ids are never hard-coded elsewhere: `fuyu_tokens(tokenizer)` looks them up.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

IMAGE_TOKEN = "|SPEAKER|"
NEWLINE_TOKEN = "|NEWLINE|"
BOS_TOKEN = "<s>"
END_TOKEN = "|ENDOFTEXT|"
BOA_TOKEN = "<0x04>"  # "beginning of answer"
UNK_TOKEN = "<unk>"
SPACE_PIECE = "▁"

# Common English words (written with the Metaspace word-start marker) keep the tiny model's sequences short; any
# text still encodes without them through single characters and byte fallback.
_COMMON_WORDS = (
    "the of and to in a is that for it as was with be by on not he I this are or his from at which but have an "
    "they you were her she there one all we their been has when who will more no if out so said what up its "
    "about into than them can only other new some could time these two may then do first any my now such like "
    "our over man me even most made after also did many before must through back years where much your way well "
    "down should because each just those people how too little state good very make world still own see men "
    "work long get here between both life being under never day same another know while last might us great "
    "old year off come since against go came right used take three image picture photo color colour left "
    "top bottom small large object answer question yes What Which How Is Are Where Does The A B C D User "
    "Assistant describe shown red green blue yellow black white number count"
).split()

# Scores are log-probabilities for the Unigram Viterbi search: a known word beats spelling it out, the control
# pieces win over their spelled-out characters, and byte pieces are a last resort for characters not listed.
_SCORE_CONTROL = -1.0
_SCORE_WORD = -4.0
_SCORE_CHAR = -6.0
_SCORE_BYTE = -40.0


def _tiny_vocab() -> list[tuple[str, float]]:
    vocab: list[tuple[str, float]] = [(UNK_TOKEN, 0.0), (BOS_TOKEN, 0.0), (END_TOKEN, 0.0)]
    seen = {piece for piece, _ in vocab}

    def add(piece: str, score: float) -> None:
        if piece not in seen:
            seen.add(piece)
            vocab.append((piece, score))

    for byte in range(256):
        add(f"<0x{byte:02X}>", _SCORE_CONTROL if byte <= 4 else _SCORE_BYTE)
    add(IMAGE_TOKEN, _SCORE_CONTROL)
    add(NEWLINE_TOKEN, _SCORE_CONTROL)
    add(SPACE_PIECE, _SCORE_CHAR)
    for char in string.ascii_letters + string.digits + string.punctuation:
        add(char, _SCORE_CHAR)
    for word in _COMMON_WORDS:
        add(SPACE_PIECE + word, _SCORE_WORD)
    add("User:", _SCORE_WORD)
    add(SPACE_PIECE + "User:", _SCORE_WORD)
    add(SPACE_PIECE + "Assistant:", _SCORE_WORD)
    return vocab


def build_tiny_tokenizer(out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Build the tiny offline Fuyu-style tokenizer (vocab < 1024), save it as an HF directory, return it.

    Deterministic: the same files on every call and machine.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = _tiny_vocab()
    if len(vocab) >= 1024:
        raise AssertionError(f"tiny vocab grew to {len(vocab)} pieces; keep it under 1024")
    tok = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE_PIECE, prepend_scheme="always")
    # Llama-style decoding: `▁` -> space, byte pieces -> UTF-8, drop the one space Metaspace prepended.
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace(SPACE_PIECE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in (UNK_TOKEN, BOS_TOKEN, END_TOKEN)]
    )

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=END_TOKEN,
        model_max_length=1 << 20,
        clean_up_tokenization_spaces=False,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_tok.save_pretrained(str(out))
    _make_deterministic(out)
    return load_tokenizer(out)


def _make_deterministic(out: Path) -> None:
    # save_pretrained writes JSON through dicts whose order is already fixed; re-dump with sorted keys anyway so
    # the files are byte-identical across library patch versions that reorder fields.
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = out / name
        if path.is_file():
            data = json.loads(path.read_text())
            path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load an HF tokenizer from a local directory (a Fuyu model dir such as adept/fuyu-8b's, or the tiny one).

    Never touches the network; raises `ValueError` when the directory is missing or holds no tokenizer.
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"tokenizer directory not found: {path}")
    if not any(
        (path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    ):
        raise ValueError(
            f"{path} holds no tokenizer files (tokenizer.json / tokenizer.model / tokenizer_config.json)"
        )
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


@dataclass(frozen=True)
class FuyuTokens:
    """Ids of the tokens Fuyu's layout is built from, looked up from a tokenizer."""

    image: int  # |SPEAKER|, the image-patch placeholder
    newline: int  # |NEWLINE|, ends each row of patches
    bos: int  # <s>, between the image and the prompt
    end: int  # |ENDOFTEXT| (else the tokenizer's eos), ends every answer
    boa: int  # <0x04>, beginning of answer


def fuyu_tokens(tokenizer: PreTrainedTokenizerBase) -> FuyuTokens:
    """Look up Fuyu's special token ids; `ValueError` naming every token the tokenizer lacks."""
    vocab = tokenizer.get_vocab()
    end_name = END_TOKEN if END_TOKEN in vocab else tokenizer.eos_token
    wanted = {
        "image": IMAGE_TOKEN,
        "newline": NEWLINE_TOKEN,
        "bos": BOS_TOKEN,
        "end": end_name,
        "boa": BOA_TOKEN,
    }
    missing = [f"{field} ({name!r})" for field, name in wanted.items() if name is None or name not in vocab]
    if missing:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} lacks Fuyu token(s): {', '.join(missing)}"
            + ("" if end_name else f"; it has neither {END_TOKEN!r} nor an eos_token")
        )
    return FuyuTokens(**{field: int(vocab[name]) for field, name in wanted.items()})
