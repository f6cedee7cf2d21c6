"""Open-set evaluation on host (numpy) arrays, following the official ``eval.py``; and
the closed-set SSL protocol's top-1/top-5 accuracy (:func:`closed_set_metrics`).

* closed accuracy: argmax of the closed-set logits on the ID samples;
* open balanced accuracy: ``balanced_accuracy_score`` over ``K + 1`` classes, every
  OOD label mapped to ``K`` ("unknown") and the prediction replaced by ``K`` where
  the algorithm's OOD score crosses the threshold of :data:`THRESHOLD_RULES`;
* AUROC of ID vs OOD from the same score (the official code reports none; OOD is
  the positive class, the score oriented so that larger means more OOD).

The threshold rule ``"official"`` is the official ``eval.py``'s: for the IOMatch and
OpenMatch scores, Otsu's threshold on the scores of the evaluated test set itself
(transductive: it uses the test scores, not labels); for the maximum softmax probability
(FixMatch, the supervised baseline), the fixed 0.95. ``"otsu"`` takes Otsu's threshold
for every score, so that all algorithms are thresholded alike.

Example:
  >>> import numpy as np
  >>> logits = np.array([[3.0, 0.0], [0.0, 3.0], [1.0, 0.0], [0.0, 0.2]])
  >>> labels = np.array([0, 1, 2, 2])                  # K = 2; label 2 = unknown
  >>> score, rule = ood_score("fixmatch", {"logits": logits})
  >>> m = open_set_metrics(logits, score, rule, labels, num_classes=2)
  >>> m["open_bacc"], m["auroc"], m["unknown_rate"]
  (1.0, 1.0, 0.5)
"""

from __future__ import annotations

import warnings
from typing import Any, Literal, Mapping

import numpy as np
from scipy.special import softmax  # scipy is a dependency of scikit-learn
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, recall_score, roc_auc_score,
                             top_k_accuracy_score)

UnknownIf = Literal["high", "low"]

# algorithm or score kind (``Algorithm.ood_score``) -> which score (see ood_score); the
# ggr* variants share their base's heads.
SCORE_KINDS = ("msp", "iomatch", "ova")
_SCORE_KIND = {
    **{kind: kind for kind in SCORE_KINDS},
    "supervised": "msp",
    "fixmatch": "msp",
    "iomatch": "iomatch",
    "ggriomatch": "iomatch",
    "openmatch": "ova",
    "ggropenmatch": "ova",
}
ALGORITHMS = tuple(_SCORE_KIND)
THRESHOLD_RULES = ("official", "otsu")
# score kind -> the official eval.py's fixed threshold (the others take Otsu's)
OFFICIAL_FIXED_THRESHOLD = {"msp": 0.95}


def threshold_for(algorithm: str, score: np.ndarray, rule: str = "official") -> float:
  """The decision threshold of ``algorithm``'s score under ``rule`` (:data:`THRESHOLD_RULES`).

  Example:
    >>> threshold_for("fixmatch", np.array([0.2, 0.9, 0.99]))
    0.95
  """
  if rule not in THRESHOLD_RULES:
    raise ValueError(f"threshold rule {rule!r} is unknown; choose one of {THRESHOLD_RULES}.")
  kind = _SCORE_KIND.get(algorithm)
  if kind is None:
    raise ValueError(f"No OOD score for algorithm {algorithm!r}; supported: {ALGORITHMS}.")
  if rule == "official" and kind in OFFICIAL_FIXED_THRESHOLD:
    return OFFICIAL_FIXED_THRESHOLD[kind]
  return otsu_threshold(score)


def _logits_2d(logits: Any, name: str) -> np.ndarray:
  logits = np.asarray(logits, dtype=np.float64)
  if logits.ndim != 2 or logits.shape[1] < 1:
    raise ValueError(f"{name} must be (N, K) logits, got shape {logits.shape}.")
  if not np.all(np.isfinite(logits)):
    raise ValueError(f"{name} holds NaN or inf values.")
  return logits


def _int_labels(labels: Any, name: str, length: int) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{name} must be a 1-D integer array, got dtype {labels.dtype} and "
                     f"shape {labels.shape}.")
  if labels.size != length:
    raise ValueError(f"{name} has {labels.size} entries for {length} samples.")
  if labels.size and labels.min() < 0:
    raise ValueError(f"{name} holds a negative label ({labels.min()}).")
  return labels


def closed_set_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
  """Top-1 accuracy of ``argmax(logits)`` against integer ``labels``.

  Example:
    >>> closed_set_accuracy(np.array([[2.0, 1.0], [0.0, 1.0], [5.0, 0.0]]), np.array([0, 1, 1]))
    0.666...
  """
  logits = _logits_2d(logits, "logits")
  labels = _int_labels(labels, "labels", len(logits))
  if not labels.size:
    raise ValueError("closed_set_accuracy needs at least one sample.")
  return float(accuracy_score(labels, logits.argmax(axis=1)))


def closed_set_metrics(logits: np.ndarray, labels: np.ndarray, num_classes: int
                       ) -> dict[str, Any]:
  """The closed-set SSL protocol's metrics: every test sample is of a known class.

  Returns ``closed_acc`` (top-1), ``top5_acc`` (the label among the five largest
  logits; only with more than five classes, where it is not trivially 1),
  ``closed_per_class_acc`` and ``mean_class_acc`` (their mean over present classes).

  Example:
    >>> logits = np.eye(7)[[0, 1, 2, 3]] + np.arange(7) * 0.01
    >>> m = closed_set_metrics(logits, np.array([0, 1, 2, 6]), 7)
    >>> m["closed_acc"], m["top5_acc"], m["mean_class_acc"]
    (0.75, 1.0, 0.75)
  """
  logits = _logits_2d(logits, "logits")
  if logits.shape[1] != num_classes:
    raise ValueError(f"logits have {logits.shape[1]} classes, num_classes is {num_classes}.")
  labels = _int_labels(labels, "labels", len(logits))
  per_class = per_class_accuracy(logits.argmax(axis=1), labels, num_classes)
  metrics = {"closed_acc": closed_set_accuracy(logits, labels),
             "closed_per_class_acc": per_class.tolist(),
             "mean_class_acc": float(np.nanmean(per_class))}
  if num_classes > 5:
    metrics["top5_acc"] = float(top_k_accuracy_score(labels, logits, k=5,
                                                     labels=np.arange(num_classes)))
  return metrics


def per_class_accuracy(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
  """Recall of each class ``0..num_classes-1``; NaN for a class absent from ``labels``.

  A prediction outside ``0..num_classes-1`` counts as a miss.

  Example:
    >>> per_class_accuracy(np.array([0, 1, 1, 2]), np.array([0, 0, 1, 1]), 3)
    array([0.5, 0.5, nan])
  """
  pred = np.asarray(pred)
  labels = _int_labels(labels, "labels", pred.size)
  if labels.size and labels.max() >= num_classes:
    raise ValueError(f"labels hold class {labels.max()} but num_classes is {num_classes}.")
  return recall_score(labels, pred.reshape(-1), labels=np.arange(num_classes), average=None,
                      zero_division=np.nan).astype(np.float64)


def otsu_threshold(scores: np.ndarray, nbins: int = 256) -> float:
  """Otsu's threshold with scikit-image's ``threshold_otsu`` semantics.

  Hand-written because scikit-image is not a dependency. The scores are binned into
  ``nbins`` equal bins over ``[min, max]``; the threshold is the bin centre that ends
  the lower class when the between-class variance is largest (the first such centre
  on ties). All-equal scores return that value.

  Example:
    >>> otsu_threshold(np.array([0.0, 0.0, 1.0, 3.0, 3.0]), nbins=4)
    1.125
  """
  scores = np.asarray(scores, dtype=np.float64).reshape(-1)
  if not scores.size:
    raise ValueError("otsu_threshold needs at least one score.")
  if not np.all(np.isfinite(scores)):
    raise ValueError("otsu_threshold: scores hold NaN or inf values.")
  if isinstance(nbins, bool) or not isinstance(nbins, (int, np.integer)) or nbins < 2:
    raise ValueError(f"nbins must be an integer >= 2, got {nbins!r}.")
  if np.all(scores == scores[0]):
    return float(scores[0])
  counts, edges = np.histogram(scores, bins=nbins, range=(scores.min(), scores.max()))
  centres = (edges[:-1] + edges[1:]) / 2
  # Split after bin i: lower class = bins 0..i, upper = bins i+1..; both are non-empty
  # because the first bin holds the minimum and the last the maximum.
  w_low = np.cumsum(counts)[:-1]
  w_high = np.cumsum(counts[::-1])[::-1][1:]
  mass = counts * centres
  mean_low = np.cumsum(mass)[:-1] / w_low
  mean_high = np.cumsum(mass[::-1])[::-1][1:] / w_high
  between = w_low * w_high * (mean_low - mean_high) ** 2
  return float(centres[np.argmax(between)])


def ood_score(algorithm: str, outputs: Mapping[str, np.ndarray]) -> tuple[np.ndarray, UnknownIf]:
  """The per-sample OOD score of ``algorithm`` and the side on which it means unknown.

  ``algorithm`` is an algorithm name or a score kind (``msp``, ``iomatch``, ``ova``).

  ``outputs`` are the model outputs as numpy arrays: ``logits`` (N, K) always,
  ``logits_mb`` (N, 2, K) for iomatch, ``logits_ova`` (N, 2, K) for openmatch, with
  index 0 = outlier/negative and 1 = inlier/positive on axis 1.

  * ``openmatch``, ``ggropenmatch``: ``p_neg`` of the predicted closed class from the
    OVA softmax over axis 1; unknown if ``score >= threshold`` (``"high"``).
  * ``iomatch``, ``ggriomatch``: ``max_k p_k * r_pos,k`` (p = closed softmax, r =
    multi-binary softmax); unknown if ``score < threshold`` (``"low"``).
  * ``fixmatch``, ``supervised`` (not in the official table): the maximum softmax
    probability, the standard baseline score for a closed-set classifier; unknown if
    ``score < threshold`` (``"low"``).

  Example:
    >>> score, rule = ood_score("supervised", {"logits": np.array([[0.0, 0.0]])})
    >>> score, rule
    (array([0.5]), 'low')
  """
  kind = _SCORE_KIND.get(algorithm)
  if kind is None:
    raise ValueError(f"No OOD score for algorithm {algorithm!r}; supported: {ALGORITHMS}.")
  if "logits" not in outputs:
    raise KeyError(f"outputs need 'logits' for {algorithm}; got keys {sorted(outputs)}.")
  logits = _logits_2d(outputs["logits"], "outputs['logits']")
  probs = softmax(logits, axis=1)
  if kind == "msp":
    return probs.max(axis=1), "low"
  key = "logits_mb" if kind == "iomatch" else "logits_ova"
  if key not in outputs:
    raise KeyError(f"outputs need {key!r} for {algorithm}; got keys {sorted(outputs)}.")
  binary = np.asarray(outputs[key], dtype=np.float64)
  if binary.shape != (logits.shape[0], 2, logits.shape[1]):
    raise ValueError(f"outputs[{key!r}] must be (N, 2, K) = {(logits.shape[0], 2, logits.shape[1])}"
                     f", got {binary.shape}.")
  binary = softmax(binary, axis=1)
  if kind == "iomatch":
    return (probs * binary[:, 1, :]).max(axis=1), "low"
  pred = logits.argmax(axis=1)
  return binary[np.arange(len(pred)), 0, pred], "high"


def open_set_metrics(closed_logits: np.ndarray, score: np.ndarray, unknown_if: UnknownIf,
                     labels_full: np.ndarray, num_classes: int,
                     threshold: float | None = None) -> dict[str, Any]:
  """Open-set metrics on a test set holding ID and OOD samples.

  Args:
    closed_logits: (N, K) closed-set logits.
    score: (N,) OOD score from :func:`ood_score`.
    unknown_if: ``"high"`` (unknown where ``score >= threshold``) or ``"low"``
      (unknown where ``score < threshold``).
    labels_full: (N,) labels; ``0..K-1`` are ID, every label ``>= K`` is OOD and is
      mapped to ``K``.
    num_classes: K.
    threshold: the decision threshold; None (default) takes Otsu's threshold on
      ``score`` itself, transductively, as the official code does.

  Returns:
    A dict with ``open_bacc`` (balanced accuracy over the classes present among
    ``K + 1``), ``auroc`` (ID vs OOD, OOD positive; NaN without a warning when only
    one group is present), ``closed_acc`` (argmax accuracy on the ID rows; NaN
    without ID rows), ``per_class_acc`` (K + 1 recalls, the last for unknown; NaN for
    an absent class), ``threshold``, ``unknown_rate`` (fraction predicted unknown),
    ``num_id`` and ``num_ood``.
  """
  logits = _logits_2d(closed_logits, "closed_logits")
  if logits.shape[1] != num_classes:
    raise ValueError(f"closed_logits have {logits.shape[1]} classes, num_classes is {num_classes}.")
  score = np.asarray(score, dtype=np.float64)
  if score.shape != (len(logits),):
    raise ValueError(f"score must be ({len(logits)},), got shape {score.shape}.")
  if unknown_if not in ("high", "low"):
    raise ValueError(f"unknown_if must be 'high' or 'low', got {unknown_if!r}.")
  labels = np.minimum(_int_labels(labels_full, "labels_full", len(logits)), num_classes)
  if not labels.size:
    raise ValueError("open_set_metrics needs at least one sample.")

  thr = otsu_threshold(score) if threshold is None else float(threshold)
  unknown = score >= thr if unknown_if == "high" else score < thr
  closed_pred = logits.argmax(axis=1)
  pred = np.where(unknown, num_classes, closed_pred)

  with warnings.catch_warnings():
    # Predicting "unknown" on a test set without OOD rows is a legitimate miss.
    warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
    open_bacc = float(balanced_accuracy_score(labels, pred))

  is_ood = labels == num_classes
  num_ood = int(is_ood.sum())
  if 0 < num_ood < labels.size:
    oriented = score if unknown_if == "high" else -score
    auroc = float(roc_auc_score(is_ood, oriented))
  else:
    auroc = float("nan")
  closed_acc = (float(np.mean(closed_pred[~is_ood] == labels[~is_ood]))
                if num_ood < labels.size else float("nan"))
  return {
      "open_bacc": open_bacc,
      "auroc": auroc,
      "closed_acc": closed_acc,
      "per_class_acc": per_class_accuracy(pred, labels, num_classes + 1).tolist(),
      "threshold": thr,
      "unknown_rate": float(unknown.mean()),
      "num_id": int(labels.size - num_ood),
      "num_ood": num_ood,
  }


def evaluate_outputs(algorithm: str, outputs_id_test: Mapping[str, np.ndarray],
                     labels_id: np.ndarray, outputs_full: Mapping[str, np.ndarray],
                     labels_full: np.ndarray, num_classes: int,
                     threshold_rule: str = "official") -> dict[str, Any]:
  """Closed accuracy on the ID test split plus the open-set metrics on the full split,
  thresholded by ``threshold_rule`` (:func:`threshold_for`).

  Returns the keys of :func:`open_set_metrics`, with ``closed_acc`` taken from the ID
  split (the official training-time metric) and the full split's ID-row accuracy
  kept as ``full_closed_acc``, plus ``algorithm``.
  """
  if "logits" not in outputs_id_test:
    raise KeyError(f"outputs_id_test need 'logits'; got keys {sorted(outputs_id_test)}.")
  labels_id = np.asarray(labels_id)
  if labels_id.size and np.max(labels_id) >= num_classes:
    raise ValueError(f"labels_id must be ID labels 0..{num_classes - 1}, got {np.max(labels_id)}.")
  closed_acc = closed_set_accuracy(outputs_id_test["logits"], labels_id)
  score, unknown_if = ood_score(algorithm, outputs_full)
  threshold = threshold_for(algorithm, score, threshold_rule)
  metrics = open_set_metrics(outputs_full["logits"], score, unknown_if, labels_full, num_classes,
                             threshold=threshold)
  metrics["full_closed_acc"] = metrics.pop("closed_acc")
  return {"algorithm": algorithm, "closed_acc": closed_acc, **metrics}


def category_discovery_accuracy(pred: np.ndarray, labels: np.ndarray,
                                old_classes: Any) -> dict[str, float]:
  """All / Old / New accuracy of generalized category discovery under one Hungarian
  assignment of predicted clusters to classes over all samples (the official "v2"
  metric of GCD codebases): the assignment maximises the matched count; ``all`` is its
  share of every sample, ``old`` (``new``) the share of the samples whose true class is
  (is not) in ``old_classes`` that land in their class's assigned cluster. NaN for a
  subset with no sample.

  Example:
    >>> pred = np.array([1, 1, 0, 0, 2, 2])      # clusters named arbitrarily
    >>> labels = np.array([0, 0, 1, 1, 2, 3])    # classes 0, 1 old; 2, 3 new
    >>> category_discovery_accuracy(pred, labels, old_classes=[0, 1])
    {'all': 0.8333333333333334, 'old': 1.0, 'new': 0.5}
  """
  from scipy.optimize import linear_sum_assignment  # pylint: disable=import-outside-toplevel

  pred = np.asarray(pred).reshape(-1).astype(np.int64)
  labels = _int_labels(labels, "labels", pred.size)
  if pred.size == 0:
    raise ValueError("category_discovery_accuracy needs at least one sample.")
  if pred.min() < 0:
    raise ValueError(f"cluster ids must be >= 0, got {pred.min()}.")
  size = int(max(pred.max(), labels.max())) + 1
  counts = np.zeros((size, size), np.int64)  # [cluster, class]
  np.add.at(counts, (pred, labels), 1)
  clusters, classes = linear_sum_assignment(counts, maximize=True)
  cluster_of = np.empty(size, np.int64)
  cluster_of[classes] = clusters
  hit = pred == cluster_of[labels]
  old = np.isin(labels, np.asarray(list(old_classes)))
  share = lambda m: float(np.mean(hit[m])) if m.any() else float("nan")
  return {"all": float(np.mean(hit)), "old": share(old), "new": share(~old)}


def category_discovery_metrics(logits_unlabeled: np.ndarray, y_unlabeled: np.ndarray,
                               logits_test: np.ndarray, y_test: np.ndarray,
                               num_old_classes: int) -> dict[str, Any]:
  """The GCD protocol's figures: All/Old/New accuracy on the unlabeled training images
  (``gcd_*``, the official transductive metric) and on the test split (``gcd_test_*``),
  each under its own Hungarian assignment; ``closed_acc`` is the test All accuracy (the
  figure runs and sweeps compare), ``closed_per_class_acc`` the test recall per class
  under that assignment's cluster names (raw argmax)."""
  old = range(num_old_classes)
  num_classes = _logits_2d(logits_test, "logits_test").shape[1]
  train = category_discovery_accuracy(np.argmax(logits_unlabeled, -1), y_unlabeled, old)
  test = category_discovery_accuracy(np.argmax(logits_test, -1), y_test, old)
  return {"protocol": "gcd", "closed_acc": test["all"],
          **{f"gcd_{k}": v for k, v in train.items()},
          **{f"gcd_test_{k}": v for k, v in test.items()},
          "closed_per_class_acc": per_class_accuracy(np.argmax(logits_test, -1), y_test,
                                                     num_classes).tolist()}
