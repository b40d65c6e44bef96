"""`internvl-tune eval retrieval` and the clip_benchmark/cli.py entry on the sample's retrieval splits."""

import importlib.util
import json
from pathlib import Path

import pytest

from internvl_tune.cli import main

KEYS = ["image_retrieval_recall@1", "text_retrieval_recall@1", "image_retrieval_recall@5",
        "text_retrieval_recall@5", "image_retrieval_recall@10", "text_retrieval_recall@10"]


def _clip_benchmark_main():
    path = Path(__file__).resolve().parents[2] / "clip_benchmark" / "cli.py"
    spec = importlib.util.spec_from_file_location("clip_benchmark_cli", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_seed_command_writes_clip_benchmark_json(tiny_ckpt, sample_dir, tmp_path):
    out = tmp_path / "result_ft.json"
    rc = _clip_benchmark_main()([
        "eval", "--model_type", "internvl", "--language", "en", "--task", "zeroshot_retrieval",
        "--dataset", "flickr30k", "--dataset_root", str(sample_dir / "flickr30k"),
        "--model", "internvl_c_retrieval_hf", "--pretrained", str(tiny_ckpt), "--output", str(out),
        "--batch_size", "4"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert list(data) == ["dataset", "model", "pretrained", "task", "metrics", "language"]
    assert data["dataset"] == "flickr30k" and data["task"] == "zeroshot_retrieval" and data["language"] == "en"
    assert list(data["metrics"]) == KEYS
    # the values: the checkpoint's embeddings of the whole test split (6 images, 30 captions), counted by rank
    expected = _recall_by_rank(tiny_ckpt, sample_dir / "flickr30k", "flickr30k_test_karpathy.txt", [1, 5, 10])
    for key in KEYS:
        assert abs(data["metrics"][key] - expected[key]) < 1e-6, (key, data["metrics"], expected)
    assert 0 < data["metrics"]["image_retrieval_recall@1"] < 1  # a random tiny model: a discriminating number


def _recall_by_rank(ckpt, root: Path, annotation: str, ks: list[int]) -> dict[str, float]:
    """clip_benchmark's recall@k, by its definition: a caption hits when fewer than k images score higher than its
    own; an image hits when, for one of its captions, fewer than k captions score higher than that one."""
    from internvl_tune.data.retrieval import flickr_eval_set, tokenize_retrieval
    from internvl_tune.eval.retrieval import compute_embeddings
    from internvl_tune.models.internvl_cg.loading import load_internvl_cg
    from internvl_tune.models.internvl_cg.tokenizer import load_tokenizer

    model = load_internvl_cg(ckpt, dtype="fp32")
    tokenizer = load_tokenizer(ckpt, add_eos_token=True)
    dataset = flickr_eval_set(root / annotation, root / "Images")
    images, texts = compute_embeddings(model, dataset, lambda t: tokenize_retrieval(tokenizer, t)[0], "InternVL-C",
                                       model.config.image_size, batch_size=4)
    scores, owner = (texts @ images.t()).tolist(), dataset.text_image_index()
    out = {}
    for k in ks:
        t2i = [sum(s > row[owner[t]] for s in row) < k for t, row in enumerate(scores)]
        i2t = [any(sum(scores[u][i] > scores[t][i] for u in range(len(scores))) < k
                   for t in range(len(scores)) if owner[t] == i) for i in range(len(images))]
        out[f"image_retrieval_recall@{k}"] = sum(t2i) / len(t2i)
        out[f"text_retrieval_recall@{k}"] = sum(i2t) / len(i2t)
    return out


@pytest.mark.parametrize("dataset,language", [("flickr30k", "cn"), ("coco", "en")])
def test_other_splits_and_g_mode(tiny_ckpt, sample_dir, tmp_path, dataset, language):
    out = tmp_path / "{dataset}_{language}.json"
    rc = main(["eval", "retrieval", "--dataset", dataset, "--language", language, "--dataset_root",
               str(sample_dir / dataset), "--model", "internvl_g_retrieval_hf", "--pretrained", str(tiny_ckpt),
               "--output", str(out), "--quiet"])
    assert rc == 0
    data = json.loads((tmp_path / f"{dataset}_{language}.json").read_text())
    assert data["model"] == "internvl_g_retrieval_hf" and list(data["metrics"]) == KEYS


def test_custom_registered_dataset_and_errors(tiny_ckpt, sample_dir, tmp_path, capsys):
    reg = tmp_path / "datasets.json"
    reg.write_text(json.dumps({"mine_flickr_format": {
        "root": str(sample_dir / "flickr30k" / "Images"),
        "annotation": str(sample_dir / "flickr30k" / "flickr30k_val_karpathy.txt")}}))
    out = tmp_path / "r.json"
    assert main(["eval", "retrieval", "--dataset", "mine_flickr_format", "--datasets_file", str(reg),
                 "--pretrained", str(tiny_ckpt), "--output", str(out), "--quiet", "--recall_k", "1", "2"]) == 0
    assert list(json.loads(out.read_text())["metrics"]) == [
        "image_retrieval_recall@1", "text_retrieval_recall@1", "image_retrieval_recall@2", "text_retrieval_recall@2"]
    assert main(["eval", "retrieval", "--dataset", "flickr30k", "--dataset_root", str(tmp_path),
                 "--pretrained", str(tiny_ckpt), "--output", str(out)]) == 2
    assert "flickr30k_test_karpathy.txt not found" in capsys.readouterr().err
