"""Conversation templates: how a list of ``human`` / ``gpt`` turns becomes the prompt string.

The chat templates produce exactly the strings the reference builds (``system_template + sep`` then
``role + message + sep`` per turn). A prompt is kept as a list of :class:`Turn` pieces whose concatenation is that
string; pieces meet just before a special token, so tokenizing them one by one gives the same ids as tokenizing the
whole string, and each answer's tokens are known without searching.

| template         | used by (LLM)                          | user / assistant header                                | turn end          |
|------------------|----------------------------------------|--------------------------------------------------------|-------------------|
| `internlm2-chat` | InternVL2-2B/8B/26B (InternLM2)         | `<|im_start|>user\\n` / `<|im_start|>assistant\\n`       | `<|im_end|>`       |
| `Hermes-2`       | InternVL2-1B (Qwen2), 40B, 76B          | same as internlm2-chat                                 | `<|im_end|>`       |
| `phi3-chat`      | InternVL2-4B (Phi-3)                    | `<|user|>\\n` / `<|assistant|>\\n`                       | `<|end|>`          |
| `internvl2_5`    | InternVL2.5, InternVL3, InternVL3.5     | same as internlm2-chat                                 | `<|im_end|>\\n`     |
| `internvl3_5_gpt_oss` | InternVL3.5-GPT-OSS-20B-A4B (GPT-OSS) | `<|start|>user<|message|>` / `<|start|>assistant`  | `<|end|>`          |
| `plain`          | base LLMs without a chat format         | none                                                   | `\\n`              |

InternVL3.5's thinking mode is no template of its own: the ``internvl2_5`` prompt with
:data:`THINKING_SYSTEM_MESSAGE` as its system message, after which the model answers ``<think>...</think>`` and then the
answer. ``--thinking_mode`` picks the system message (:func:`thinking_system_message`); an answer's thinking is part
of the answer, supervised like the rest of it, as the reference trains it.

``internvl3_5_gpt_oss`` is OpenAI's harmony format as the reference trains GPT-OSS: every answer opens with
``<|channel|>final<|message|>`` (its ``answer_prefix``, supervised with the answer) and ends with ``<|end|>``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from internvl_tune.errors import DataError

# The reference's default system messages (Chinese); the model was trained with them, so keep them verbatim.
SYSTEM_INTERNVL2 = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
SYSTEM_INTERNVL2_5 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
# The reference's GPT-OSS system message (harmony: knowledge cutoff, date, reasoning effort, the channels allowed).
SYSTEM_GPT_OSS = ("You are InternVL, a large language model trained by Shanghai AI Laboratory.\nKnowledge cutoff: 2024-06\n"
                  "Current date: 2025-08-06\n\nReasoning: low\n\n# Valid channels: final. Channel must be included for "
                  "every message.")
# InternVL3.5's thinking-mode system prompt (its model card's), verbatim: the model was trained to think after it.
THINKING_SYSTEM_MESSAGE = (
    "You are an AI assistant that rigorously follows this response protocol:\n"
    "1. First, conduct a detailed analysis of the question. Consider different angles, potential solutions, and reason "
    "through the problem step-by-step. Enclose this entire thinking process within <think> and </think> tags.\n"
    "2. After the thinking section, provide a clear, concise, and direct answer to the user's question. Separate the "
    "answer from the think section with a newline.\n"
    "Ensure that the thinking process is thorough but remains focused on the query. The final answer should be "
    "standalone and not reference the thinking section."
)
THINK_START, THINK_END = "<think>", "</think>"
THINKING_MODES = ("auto", "on", "off")

HUMAN, GPT, SYSTEM = "human", "gpt", "system"


@dataclass(frozen=True)
class Template:
    """One conversation format.

    Attributes:
        name: the ``--conv_style`` value.
        system_template: ``{system_message}`` is filled in; None means the format has no system block.
        system_message: the default system message.
        roles: (user header, assistant header).
        sep: appended after the system block and after every message.
        answer_end: the leading part of ``sep`` that is supervised after an answer (the rest is masked).
        strip_values: strip whitespace around every message first (the reference does for internlm2-chat only).
        system_turn: a leading ``system`` turn may replace the system message (internvl2_5).
        alternating: turns must alternate human/gpt (the reference asserts it except for internvl2_5).
        images_in_human_only: ``<image>`` is expanded in human turns only (internvl2_5) instead of anywhere.
        stop_str: the end-of-turn text generation stops at.
        unsupervised_tokens: tokens never supervised even inside an answer (phi3-chat masks ``<|endoftext|>``).
        answer_prefix: text that opens every answer after the assistant header, supervised with it (harmony's
            ``<|channel|>final<|message|>``); a generation prompt ends with it.
    """

    name: str
    system_template: str | None
    system_message: str
    roles: tuple[str, str]
    sep: str
    answer_end: str
    strip_values: bool = False
    system_turn: bool = False
    alternating: bool = True
    images_in_human_only: bool = False
    stop_str: str | None = None
    unsupervised_tokens: tuple[str, ...] = ()
    answer_prefix: str = ""

    @property
    def special_texts(self) -> tuple[str, ...]:
        """Structural strings that must not appear inside a message (they would break the turn layout)."""
        parts = {self.roles[0].strip(), self.roles[1].strip(), self.sep.strip()}
        # a part made of several special tokens (harmony's "<|start|>user<|message|>") counts as each of them
        return tuple(sorted({t for p in parts if p.startswith("<|") and p.endswith("|>")
                             for t in re.findall(r"<\|[^|]*\|>", p)}))

    def turns(self, messages: list[tuple[str, str]], system_message: str | None = None) -> list["Turn"]:
        """The prompt as pieces, for ``messages`` = [(role, text), ...] with role ``human`` or ``gpt``."""
        pieces: list[Turn] = []
        if self.system_template is not None:
            system = self.system_message if system_message is None else system_message
            pieces.append(Turn(SYSTEM, "", self.system_template.format(system_message=system) + self.sep))
        for role, text in messages:
            header, prefix = (self.roles[0], "") if role == HUMAN else (self.roles[1], self.answer_prefix)
            pieces.append(Turn(role, header, prefix + text + self.sep))
        return pieces

    def prompt(self, messages: list[tuple[str, str]], system_message: str | None = None) -> str:
        """The full prompt string (what the reference tokenizes)."""
        return "".join(t.text for t in self.turns(messages, system_message))

    def generation_prompt(self, messages: list[tuple[str, str]], system_message: str | None = None) -> str:
        """Prompt for inference: the conversation so far, then the assistant header with no answer yet."""
        return self.prompt(messages, system_message) + self.roles[1] + self.answer_prefix


@dataclass
class Turn:
    """One piece of a prompt: ``header + body`` where body is the message followed by the separator."""

    role: str
    header: str
    body: str

    @property
    def text(self) -> str:
        return self.header + self.body


TEMPLATES = {
    t.name: t
    for t in (
        Template(
            "internlm2-chat", "<|im_start|>system\n{system_message}", SYSTEM_INTERNVL2,
            ("<|im_start|>user\n", "<|im_start|>assistant\n"), "<|im_end|>", "<|im_end|>", strip_values=True,
            stop_str="<|im_end|>",
        ),
        Template(
            "Hermes-2", "<|im_start|>system\n{system_message}", SYSTEM_INTERNVL2,
            ("<|im_start|>user\n", "<|im_start|>assistant\n"), "<|im_end|>", "<|im_end|>", stop_str="<|endoftext|>",
        ),
        Template(
            "phi3-chat", "<|system|>\n{system_message}", SYSTEM_INTERNVL2,
            ("<|user|>\n", "<|assistant|>\n"), "<|end|>", "<|end|>", stop_str="<|end|>",
            unsupervised_tokens=("<|endoftext|>",),
        ),
        Template(
            "internvl2_5", "<|im_start|>system\n{system_message}", SYSTEM_INTERNVL2_5,
            ("<|im_start|>user\n", "<|im_start|>assistant\n"), "<|im_end|>\n", "<|im_end|>", system_turn=True,
            alternating=False, images_in_human_only=True, stop_str="<|im_end|>",
        ),
        Template(
            "internvl3_5_gpt_oss", "<|start|>system<|message|>{system_message}", SYSTEM_GPT_OSS,
            ("<|start|>user<|message|>", "<|start|>assistant"), "<|end|>", "<|end|>", system_turn=True,
            alternating=False, images_in_human_only=True, stop_str="<|end|>",
            answer_prefix="<|channel|>final<|message|>",
        ),
        Template("plain", None, "", ("", ""), "\n", "\n"),
    )
}


def get_template(name: str, system_message: str | None = None) -> Template:
    """The template called ``name`` (the ``--conv_style`` value), its default system message replaced by
    ``system_message`` when given (a sample's own system turn still wins)."""
    try:
        template = TEMPLATES[name]
    except KeyError:
        raise DataError(
            f"unknown conversation template {name!r}", fix=f"--conv_style must be one of {', '.join(TEMPLATES)}"
        ) from None
    return template if system_message is None else dataclasses.replace(template, system_message=system_message)


def thinking_system_message(mode: str, own: str | None) -> str | None:
    """The system message of a ``--thinking_mode``: ``on`` = :data:`THINKING_SYSTEM_MESSAGE`, ``off`` = the template's
    default (None), ``auto`` = ``own``, the one the checkpoint records (``config.json`` ``system_message``; None for
    the releases, which think only when asked)."""
    if mode not in THINKING_MODES:
        raise DataError(f"unknown thinking mode {mode!r}", fix=f"--thinking_mode must be one of {', '.join(THINKING_MODES)}")
    return {"on": THINKING_SYSTEM_MESSAGE, "off": None, "auto": own}[mode]


def is_thinking_answer(text: str) -> bool:
    """True for an answer that reasons inside ``<think>...</think>`` before answering."""
    start = text.find(THINK_START)
    return start >= 0 and text.find(THINK_END, start) > start
