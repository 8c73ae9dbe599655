"""Normalisation statistics of the vision families: ``(mean, std)`` per RGB channel, for pixels
in [0, 1]. The one table every family reads.

* ``IMAGENET``: MAE, DINOv2, MoCo v3 and most timm ViTs;
* ``OPENAI_CLIP``: CLIP;
* ``HALF``: BEiT, VQGAN, SigLIP (pixels mapped to [-1, 1]).

A checkpoint's own ``preprocessor_config.json`` (``image_mean`` / ``image_std``) takes precedence
where it has one (:func:`lm4lv_core.vision.base.checkpoint_stats`).
"""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)

IMAGENET = (IMAGENET_MEAN, IMAGENET_STD)
OPENAI_CLIP = (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
HALF = (HALF_MEAN, HALF_STD)
