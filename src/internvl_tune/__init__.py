"""internvl-tune: fine-tune and evaluate InternVL models without remote code.

Library layers (``data``, ``models``, ``eval``) never import the application layers (``train``, ``cli``).
"""

from internvl_tune.noise import quiet

__version__ = "0.1.0"
quiet()  # two known-wrong third-party warnings (see noise.py)


def load_pretrained(path, **kwargs):
    """Load an InternVL2 chat checkpoint (original or transformers-native layout).

    Returns an :class:`internvl_tune.models.internvl_chat.InternVLChat` with ``.model``, ``.tokenizer``,
    ``.image_processor`` and ``.chat()`` / ``.batch_chat()``. See that function for keyword arguments.
    """
    from internvl_tune.models.internvl_chat import load_pretrained as _load

    return _load(path, **kwargs)


def load_internvl_cg(path, **kwargs):
    """Load an InternVL-14B checkpoint (InternVL-C / InternVL-G: retrieval and captioning).

    Returns an :class:`internvl_tune.models.internvl_cg.model.InternVLModel`: ``model(image, text, mode="C")`` gives
    ``(logits_per_image, logits_per_text)``; ``encode_image(x, "G")``, ``encode_text(ids)``, ``generate(...)``. See
    :func:`internvl_tune.models.internvl_cg.loading.load_internvl_cg` for keyword arguments.
    """
    from internvl_tune.models.internvl_cg.loading import load_internvl_cg as _load

    return _load(path, **kwargs)
