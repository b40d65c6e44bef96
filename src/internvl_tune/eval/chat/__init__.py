"""Generation eval on held-out data: did the fine-tune learn the task?

``samples`` turns the lines of a meta JSON (or a named benchmark of ``datasets``) into generation prompts with the
last answer as the reference, ``run`` generates through ``InternVLChat.generate`` across ranks and scores with
``metrics`` (exact match, relaxed accuracy, ANLS, choice letters, BLEU-4 / ROUGE-L / CIDEr). Used by
``internvl-tune eval chat`` and by training's ``--eval_generate``.
"""
