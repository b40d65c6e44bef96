"""The plan says when --use_llm_lora also trains whole parts (the reference's defaults), which vLLM's LoRA ignores."""

from internvl_tune.cli import main


def test_llm_lora_with_the_reference_defaults_says_the_vit_and_projector_train_in_full(tiny_1b, tmp_path, subset_meta,
                                                                                        capsys):
    common = ["train", "--model_name_or_path", str(tiny_1b), "--meta_path", str(subset_meta(tmp_path, 2)),
              "--output_dir", str(tmp_path / "run"), "--dry_run", "--report_to", "none", "--device", "cpu",
              "--use_llm_lora", "4"]
    assert main(common) == 0
    plan = " ".join(capsys.readouterr().err.split())
    assert "besides the LLM's LoRA adapters, the ViT, the projector (mlp1) train in full" in plan
    assert "vLLM's LoRA serving ignores" in plan
    assert main([*common, "--freeze_backbone", "True", "--freeze_mlp", "True"]) == 0
    assert "besides the LLM's LoRA adapters" not in " ".join(capsys.readouterr().err.split())
