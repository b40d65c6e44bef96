"""A LoRA run's checkpoint-N holds its adapter (checkpoint-N/adapter/), as the transformers Trainer writes one into
every checkpoint: peft loads it, and chat, merge-lora and convert take the checkpoint as they take the run."""

import torch
from safetensors.torch import load_file

from internvl_tune.cli import main


def test_every_checkpoint_of_a_lora_run_holds_a_loadable_adapter(tiny_1b, tmp_path, subset_meta, capsys):
    from peft import PeftModel

    from internvl_tune.models.internvl_chat import load_pretrained
    from internvl_tune.models.internvl_chat.training_checkpoint import load_checkpoint_model

    run = tmp_path / "run"
    assert main(["train", "--model_name_or_path", str(tiny_1b), "--meta_path", str(subset_meta(tmp_path, 2)),
                 "--output_dir", str(run), "--max_steps", "2", "--save_steps", "1", "--use_llm_lora", "4",
                 "--unfreeze_lm_head", "True", "--learning_rate", "1e-2", "--device", "cpu", "--report_to", "none",
                 "--dataloader_num_workers", "0", "--grad_checkpoint", "False"]) == 0
    first, last = run / "checkpoint-1" / "adapter", run / "checkpoint-2" / "adapter"
    assert (first / "adapter_config.json").is_file() and (first / "adapter_model.safetensors").is_file()
    final, at_end = load_file(str(run / "adapter" / "adapter_model.safetensors")), load_file(str(last /
                                                                                             "adapter_model.safetensors"))
    assert final.keys() == at_end.keys() and all(torch.equal(final[k], at_end[k]) for k in final)
    # peft on the base, with checkpoint-1's adapter, gives the checkpoint's own model (step 1, not the final one)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    peft_model = PeftModel.from_pretrained(load_pretrained(tiny_1b).model, str(first))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits,
                                   load_checkpoint_model(run / "checkpoint-1").model(input_ids=ids).logits)
    capsys.readouterr()
    assert main(["convert", str(run / "checkpoint-1"), str(tmp_path / "orig"), "--to", "original"]) == 0
    assert (tmp_path / "orig" / "adapter_model.safetensors").is_file()
    assert main(["merge-lora", str(run / "checkpoint-1"), "--out", str(tmp_path / "merged")]) == 0
    assert main(["chat", str(run / "checkpoint-1"), "Hi", "--max_new_tokens", "2", "--device", "cpu"]) == 0
