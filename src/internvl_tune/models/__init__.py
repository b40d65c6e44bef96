"""Model families: ``internvl_chat`` (InternVL2 chat models, on transformers' native InternVL modules)."""
