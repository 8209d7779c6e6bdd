"""Judges of generated samples that the reward never saw, to catch over-optimisation.

``DigitEvaluator`` scores 16×16 digits with a third-party MNIST CNN; ``feature_stats``
holds the feature-set statistics it reports (Fréchet distance, diversity, Vendi score).
``image_metrics`` gathers what sqdf eval takes from the field's packages on request (``lpips``,
``dreamsim``, ``fid``), each imported only when asked for.
"""

from sqdf.evaluators.digit_cnn import DigitCNN, DigitEvaluator, load_digit_cnn, weights_path
from sqdf.evaluators.feature_stats import frechet_distance, mean_pairwise_distance, vendi_score

__all__ = [
    "DigitCNN",
    "DigitEvaluator",
    "frechet_distance",
    "load_digit_cnn",
    "mean_pairwise_distance",
    "vendi_score",
    "weights_path",
]
