"""Self-contained HTML reports (inline CSS and SVG, images as base64: no network) of what a run or an evaluation
wrote: ``report.html`` of a training run, a comparison of several runs, and the pages of ``eval chat``, ``eval
caption`` and ``eval retrieval``. Application-level: it reads only the files those commands write."""

from internvl_tune.report.evals import write_caption_report, write_eval_chat_report, write_retrieval_report
from internvl_tune.report.run import REPORT, read_run, write_compare_report, write_run_report

__all__ = ["REPORT", "read_run", "write_caption_report", "write_compare_report", "write_eval_chat_report",
           "write_retrieval_report", "write_run_report"]
