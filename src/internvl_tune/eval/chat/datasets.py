"""Named chat benchmarks: one table entry each, in the shape of the caption (``eval/caption/datasets.py``) and
retrieval (``eval/retrieval_datasets.py``) tables. Your own held-out data needs no entry: ``--meta_path val.json``.

Each benchmark is a JSONL file in the reference's VQA layout (``internvl_chat/eval/vqa``), one line per question::

    {"image": "data/chartqa/test/png/41699051005347.png", "question": "...", "question_id": 1, "answer": "75"}

The reference's files name their images from the folder that holds ``data/`` (``data/chartqa/...``), so ``root`` is
``..`` (relative to the data root). ``answer`` may be a list of accepted answers (DocVQA, InfographicVQA).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from internvl_tune.data.meta import DatasetSpec
from internvl_tune.errors import DataError, UserError
from internvl_tune.eval.chat.metrics import ANSWER_METRICS, TEXT_METRICS

SHORT_ANSWER = "Answer the question using a single word or phrase."


@dataclass(frozen=True)
class ChatBenchmark:
    """Where one benchmark's questions lie (relative to the data root), how they are asked and scored."""

    name: str
    annotation: str  # the JSONL file of questions
    metric: str  # the headline metric (printed first); every metric is computed
    instruction: str = SHORT_ANSWER  # appended to each question, as the reference's evaluation prompt
    max_new_tokens: int = 100
    root: str = ".."  # the folder the image paths are relative to

    def spec(self, data_root: str | Path) -> DatasetSpec:
        """The benchmark as one dataset of a meta JSON (``data/meta.py``)."""
        root = Path(data_root)
        annotation = root / self.annotation
        if not annotation.is_file():
            raise DataError(f"{self.name}: annotation file not found", where=str(annotation),
                            fix=f"put the reference's {Path(self.annotation).name} there, or pass --data_root")
        return DatasetSpec(self.name, str(root / self.root), str(annotation))


BENCHMARKS: dict[str, ChatBenchmark] = {b.name: b for b in (
    ChatBenchmark("chartqa_test_human", "chartqa/test_human.jsonl", "relaxed_accuracy"),
    ChatBenchmark("chartqa_test_augmented", "chartqa/test_augmented.jsonl", "relaxed_accuracy"),
    ChatBenchmark("docvqa_val", "docvqa/val.jsonl", "anls"),
    ChatBenchmark("infographicsvqa_val", "infographicsvqa/val.jsonl", "anls"),
    ChatBenchmark("ocrvqa_val", "ocrvqa/ocrvqa_val.jsonl", "exact_match"),
    ChatBenchmark("ocrvqa_test", "ocrvqa/ocrvqa_test.jsonl", "exact_match"),
)}
METRICS = (*ANSWER_METRICS, *TEXT_METRICS)


def get_benchmark(name: str) -> ChatBenchmark:
    """Look a benchmark up by name, with the list of known names in the error."""
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise UserError(f"unknown chat benchmark {name!r}; choose from {', '.join(BENCHMARKS)}, or evaluate your "
                        "own data with --meta_path") from None


def parse_dataset_names(text: str | None) -> list[str]:
    """Split ``chartqa_test_human,docvqa_val`` into names, checking each one."""
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    for name in names:
        get_benchmark(name)
    return names
