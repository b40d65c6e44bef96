"""Third-party warnings that are wrong for this package, dropped by their exact text (nothing else is filtered).

- transformers warns "incorrect regex pattern ... fix_mistral_regex" when a tokenizer folder's config.json lacks a
  model type it knows: it guesses the tokenizer might be Mistral's, which an InternVL tokenizer never is;
- bitsandbytes warns "Failed to load CPU gemm_4bit_forward from kernels-community" at import on CPUs with AVX512-BF16
  (peft imports it whenever it is installed), although its own CPU kernel is then used.
"""

from __future__ import annotations

import logging

SPURIOUS = {
    "transformers.tokenization_utils_tokenizers": "fix_mistral_regex",
    "bitsandbytes.backends.cpu.ops": "gemm_4bit_forward from kernels-community",
}


class _Drop(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet() -> None:
    """Install the filters (once per logger)."""
    for name, text in SPURIOUS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(text))
