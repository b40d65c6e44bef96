"""The one data configuration of InternVL2 chat data: training, validation and ``internvl-tune data check`` use it.

Every field is a flag with the reference's name (``--max_dynamic_patch 6``). Settings a checkpoint already fixes
(template, tile size, tiling) default to ``None``, meaning "as the checkpoint's config.json says";
:meth:`DataConfig.resolve` fills them from :class:`CheckpointDefaults` and refuses values the model cannot take.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from internvl_tune.data.templates import TEMPLATES, THINKING_MODES, get_template, thinking_system_message
from internvl_tune.errors import UserError
from internvl_tune.options import option


@dataclass(frozen=True)
class CheckpointDefaults:
    """What a checkpoint's config says about its inputs (read by ``models.internvl_chat.config.data_defaults``)."""

    template: str | None
    image_size: int
    downsample_ratio: float
    num_image_token: int
    dynamic_image_size: bool
    use_thumbnail: bool
    min_dynamic_patch: int
    max_dynamic_patch: int
    system_message: str | None = None  # the checkpoint's own (config.json system_message), None: the template's


# What every released InternVL2 / 2.5 / 3 checkpoint's config.json says (448 px tiles, 14 px patches, pixel shuffle
# 0.5 -> 256 tokens; dynamic tiling into 1-12 tiles plus a thumbnail), with the reference's default template. Used
# where there is no checkpoint (`data check` without a model), so tiles and lengths are those training would use.
RELEASE_DEFAULTS = CheckpointDefaults(template="internlm2-chat", image_size=448, downsample_ratio=0.5,
                                      num_image_token=256, dynamic_image_size=True, use_thumbnail=True,
                                      min_dynamic_patch=1, max_dynamic_patch=12)
FROM_CHECKPOINT = {  # field -> CheckpointDefaults attribute
    "conv_style": "template",
    "force_image_size": "image_size",
    "down_sample_ratio": "downsample_ratio",
    "dynamic_image_size": "dynamic_image_size",
    "use_thumbnail": "use_thumbnail",
    "min_dynamic_patch": "min_dynamic_patch",
    "max_dynamic_patch": "max_dynamic_patch",
}


@dataclass
class DataConfig:
    """Data settings (reference flag names). ``None`` = the checkpoint's value."""

    meta_path: str | None = option(None, "meta JSON naming the datasets: {name: {root, annotation, data_augment, "
                                         "repeat_time, length}}")
    eval_meta_path: str | None = option(None, "meta JSON of a validation set: its loss is logged as eval_loss")
    conv_style: str | None = option(None, "conversation template (default: the checkpoint's `template`)",
                                    tuple(TEMPLATES))
    max_seq_length: int = option(8192, "truncate longer samples (never through image tokens: tiles shrink first)")
    force_image_size: int | None = option(None, "tile size in pixels (default: the checkpoint's; another size is "
                                                "refused)")
    down_sample_ratio: float | None = option(None, "pixel-shuffle ratio, 0.5 -> 256 tokens per 448 px tile (default: "
                                                   "the checkpoint's; another ratio is refused)")
    pad2square: bool = option(False, "pad images to square instead of resizing (untiled path only)")
    dynamic_image_size: bool | None = option(None, "tile each image into up to max_dynamic_patch tiles by aspect "
                                                   "ratio (default: the checkpoint's)")
    use_thumbnail: bool | None = option(None, "append a whole-image thumbnail tile when an image has more than one "
                                              "tile (default: the checkpoint's)")
    min_dynamic_patch: int | None = option(None, "fewest tiles per image (default: the checkpoint's)")
    max_dynamic_patch: int | None = option(None, "most tiles per image, split across the images of a multi-image "
                                                 "sample (default: the checkpoint's)")
    min_num_frame: int = option(8, "fewest frames sampled from a video")
    max_num_frame: int = option(32, "most frames sampled from a video")
    normalize_type: str = option("imagenet", "pixel normalisation", ("imagenet", "clip", "siglip"))
    use_packed_ds: bool = option(False, "pack several samples into one row of max_packed_tokens (attention kept per "
                                        "sample)")
    max_packed_tokens: int = option(8192, "token budget of a packed row")
    num_images_expected: int = option(40, "most tiles in a packed row")
    loss_reduction: str = option("token", "loss weight of each supervised token: token=1, sample=1/n, "
                                          "square=1/sqrt(n)", ("token", "sample", "square"))
    group_by_length: bool = option(True, "batch samples of similar length together (less padding)")
    allow_outside_root: bool = option(False, "allow image paths that resolve outside their dataset root")
    thinking_mode: str = option("auto", "system message of the samples without a system turn of their own: on = "
                                        "InternVL3.5's thinking prompt (answers reason inside <think>...</think> "
                                        "first), off = the template's default, auto = the checkpoint's (what it was "
                                        "fine-tuned with; the releases: the template's)", THINKING_MODES)
    num_image_token: int | None = option(None, "tokens per tile, from the checkpoint", flag=False)
    system_message: str | None = option(None, "the system message --thinking_mode resolves to (None: the template's)",
                                        flag=False)

    def resolve(self, defaults: CheckpointDefaults, where: str = "the checkpoint") -> DataConfig:
        """A copy with every ``None`` setting taken from ``defaults``; sizes the model cannot take are refused.

        Args:
            defaults: the checkpoint's settings (:data:`RELEASE_DEFAULTS` when there is no checkpoint).
            where: the checkpoint's name, for error messages.
        """
        for name, attr in (("force_image_size", "image_size"), ("down_sample_ratio", "downsample_ratio")):
            given, own = getattr(self, name), getattr(defaults, attr)
            if given is not None and given != own:
                raise UserError(f"--{name} {given} differs from {where}'s {attr} {own}: the model's position "
                                f"embeddings and projector are built for {own}; drop the flag or pass --{name} {own}")
        values = {name: getattr(defaults, attr) for name, attr in FROM_CHECKPOINT.items() if getattr(self, name) is None}
        if values.get("conv_style", "") is None:  # a checkpoint without a template: the reference's default
            values["conv_style"] = RELEASE_DEFAULTS.template
        system = thinking_system_message(self.thinking_mode, defaults.system_message)
        conv_style = values.get("conv_style", self.conv_style)
        if system is not None and get_template(conv_style).system_template is None:
            raise UserError(f"--thinking_mode {self.thinking_mode} gives a system message, which the {conv_style} "
                            "template has no place for: use --conv_style internvl2_5 (InternVL2.5 / 3 / 3.5) or "
                            "--thinking_mode off")
        return dataclasses.replace(self, **values, num_image_token=defaults.num_image_token, system_message=system)

    @property
    def resolved(self) -> bool:
        """True once :meth:`resolve` has filled the checkpoint's settings in."""
        return self.num_image_token is not None
