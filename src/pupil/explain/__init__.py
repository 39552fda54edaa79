"""Explanations as a library: saliency maps for a classifier and measures of how far to trust them.

``methods``: Grad-CAM and Grad-CAM++ by hand, Integrated Gradients, Occlusion, LIME and KernelSHAP through captum
(imported only when one of them runs), the ``METHODS`` table, ``explain_image`` and ``overlay_png`` for
``pupil explain``. ``faithfulness``: deletion/insertion curves (Petsiuk et al. 2018) and the model-parameter
randomisation sanity check (Adebayo et al. 2018). The audit's ``explain`` check (``pupil.audit.explain``) compares
the methods with these measures.
"""

from pupil.explain.faithfulness import (
    FLAG_SPEARMAN,
    curve_area,
    deletion_insertion,
    deletion_insertion_loop,
    randomization_spearman,
    randomized_copy,
    spearman_rows,
    step_counts,
)
from pupil.explain.methods import (
    BASELINES,
    METHODS,
    SIGNED,
    baseline_image,
    explain_image,
    gradcam,
    gradcam_pp,
    gradcam_pp_weights,
    gradcam_weights,
    integrated_gradients,
    kernel_shap,
    lime,
    method,
    occlusion,
    overlay_png,
    patch_mask,
    saliency,
    to_grid,
)

__all__ = [
    "BASELINES",
    "FLAG_SPEARMAN",
    "METHODS",
    "SIGNED",
    "baseline_image",
    "curve_area",
    "deletion_insertion",
    "deletion_insertion_loop",
    "explain_image",
    "gradcam",
    "gradcam_pp",
    "gradcam_pp_weights",
    "gradcam_weights",
    "integrated_gradients",
    "kernel_shap",
    "lime",
    "method",
    "occlusion",
    "overlay_png",
    "patch_mask",
    "randomization_spearman",
    "randomized_copy",
    "saliency",
    "spearman_rows",
    "step_counts",
    "to_grid",
]
