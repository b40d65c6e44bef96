"""InternLM2's and InternLM3's sentencepiece tokenizers (InternVL2-2B / 8B / 26B, InternVL2.5-2B / 8B / 26B,
InternVL3-9B), without remote code.

The checkpoints ship ``tokenizer.model`` plus a ``tokenizer_config.json`` naming a remote-code class. Both encode the
same way: plain sentencepiece on the text between added tokens, with ``<s>`` (BOS) in front and no ``</s>`` unless
``add_eos_token``. Decoding joins sentencepiece pieces; InternLM2 puts a space before each run of special tokens and
applies transformers' standard clean-up (tests compare ids and text with the reference), InternLM3 does neither and
drops the dummy-prefix space of the first piece when ``add_prefix_space`` (its remote class's rules, read from public
code; not run against it here).
"""

from __future__ import annotations

from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

_UNDERLINE = "\u2581"  # sentencepiece's word-start mark (the dummy prefix)
# transformers' classic clean-up of tokenization spaces (what `clean_up_tokenization` did in 4.x).
_CLEAN_UP = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]


def _clean_up(text: str) -> str:
    for old, new in _CLEAN_UP:
        text = text.replace(old, new)
    return text


class InternLM2Tokenizer(SentencePieceBackend):
    """Sentencepiece tokenizer with InternLM2's BOS/EOS rules; reads the files InternVL2 InternLM2 checkpoints ship."""

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
        add_bos_token=True,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        **kwargs,
    ):
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        kwargs.pop("legacy", None)
        kwargs.pop("decode_with_prefix_space", None)
        super().__init__(
            vocab_file=vocab_file,
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            legacy=True,  # sentencepiece sees each text chunk as is, dummy prefix included
            **kwargs,
        )

    @property
    def bos_token_id(self):
        return self.sp_model.bos_id()

    @property
    def eos_token_id(self):
        return self.sp_model.eos_id()

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        return bos + token_ids_0 + (token_ids_1 or []) + eos

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        bos = [1] if self.add_bos_token else []
        eos = [1] if self.add_eos_token else []
        return bos + [0] * (len(token_ids_0) + len(token_ids_1 or [])) + eos

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Pieces -> text: sentencepiece decodes the runs between special tokens; a space precedes a special run."""
        specials = set(self.all_special_tokens)
        out, run, prev_special = "", [], False
        for token in tokens:
            if token in specials:
                if not prev_special:
                    out += " "
                out += self.sp_model.decode(run) + token
                prev_special, run = True, []
            else:
                run.append(token)
                prev_special = False
        out += self.sp_model.decode(run)
        return _clean_up(out)

    def _decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None,
                spaces_between_special_tokens=True, **kwargs) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        specials = set(self.all_special_tokens)
        special_ids = set(self.all_special_ids)
        # Tokens added on top of the sentencepiece vocabulary are emitted verbatim, between decoded runs.
        added = {t for t in self._added_tokens_encoder if t not in specials}
        added |= {t for t in self.extra_special_tokens if self.convert_tokens_to_ids(t) >= self.vocab_size}
        parts, run = [], []
        for token_id in token_ids:
            if skip_special_tokens and token_id in special_ids:
                continue
            token = self.convert_ids_to_tokens(token_id)
            if token in added:
                if run:
                    text = self.convert_tokens_to_string(run)
                    if text:
                        parts.append(text)
                    run = []
                parts.append(token)
            else:
                run.append(token)
        if run:
            parts.append(self.convert_tokens_to_string(run))
        text = (" " if spaces_between_special_tokens else "").join(parts)
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        return _clean_up(text) if clean else text


class InternLM3Tokenizer(InternLM2Tokenizer):
    """InternLM3's tokenizer (InternVL3-9B): InternLM2's encoding, InternLM3's decoding rules (see the module doc)."""

    def __init__(self, vocab_file, add_prefix_space=True, spaces_for_interleaved_special_tokens=False, **kwargs):
        self.add_prefix_space = add_prefix_space
        self.spaces_for_interleaved_special_tokens = spaces_for_interleaved_special_tokens
        super().__init__(vocab_file, **kwargs)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Pieces -> text: sentencepiece decodes the runs between special tokens, which are kept verbatim."""
        tokens = list(tokens)
        if tokens and self.add_prefix_space and tokens[0].startswith(_UNDERLINE):
            tokens[0] = tokens[0][1:]
        specials, spaced = set(self.all_special_tokens), self.spaces_for_interleaved_special_tokens
        out, run, prev_special = "", [], False
        for i, token in enumerate(tokens):
            if token in specials:
                if spaced and not prev_special and i:
                    out += " "
                out += self.sp_model.decode(run) + token
                prev_special, run = True, []
            else:
                if spaced and prev_special and i == 1 and self.add_prefix_space and not token.startswith(_UNDERLINE):
                    out += " "
                run.append(token)
                prev_special = False
        return out + self.sp_model.decode(run)
