"""Open-set metrics against hand-computed values."""

import math
import warnings

import numpy as np
import pytest

from ggr_jax import evaluate

# Toy open-set test set, K = 2: rows 0-3 are ID (labels 0, 0, 1, 1), rows 4-5 OOD (2).
LABELS = np.array([0, 0, 1, 1, 2, 2])
LOGITS = np.array([[2.0, 0.0], [1.0, 0.5], [0.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])
# argmax = [0, 0, 1, 1, 0, 1]
SCORE = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.25])  # larger = more OOD


def test_open_set_metrics_hand_computed():
  m = evaluate.open_set_metrics(LOGITS, SCORE, "high", LABELS, 2, threshold=0.5)
  # unknown (score >= 0.5) = rows 3, 4 -> pred = [0, 0, 1, 2, 2, 1].
  # recall: class 0 = 2/2, class 1 = 1/2 (row 3 rejected), unknown = 1/2 (row 5 kept).
  assert m["per_class_acc"] == [1.0, 0.5, 0.5]
  assert m["open_bacc"] == pytest.approx(2 / 3)  # (1 + 0.5 + 0.5) / 3
  # AUROC, OOD positive: 0.8 beats all 4 ID scores, 0.25 beats 0.1 and 0.2 -> 6 / 8.
  assert m["auroc"] == pytest.approx(0.75)
  assert m["closed_acc"] == 1.0  # argmax on rows 0-3 = [0, 0, 1, 1]
  assert m["unknown_rate"] == pytest.approx(2 / 6)
  assert (m["threshold"], m["num_id"], m["num_ood"]) == (0.5, 4, 2)


def test_low_rule_with_flipped_score_gives_the_same_metrics():
  high = evaluate.open_set_metrics(LOGITS, SCORE, "high", LABELS, 2, threshold=0.5)
  low = evaluate.open_set_metrics(LOGITS, 1.0 - SCORE, "low", LABELS, 2, threshold=0.5)
  for key in ("open_bacc", "auroc", "closed_acc", "per_class_acc", "unknown_rate"):
    assert low[key] == pytest.approx(high[key]), key
  # The same score read the wrong way round inverts the ranking: AUROC 1 - 0.75.
  wrong = evaluate.open_set_metrics(LOGITS, SCORE, "low", LABELS, 2, threshold=0.5)
  assert wrong["auroc"] == pytest.approx(0.25)


def test_labels_above_k_are_unknown():
  base = evaluate.open_set_metrics(LOGITS, SCORE, "high", LABELS, 2, threshold=0.5)
  raw = evaluate.open_set_metrics(LOGITS, SCORE, "high", np.array([0, 0, 1, 1, 2, 7]), 2,
                                  threshold=0.5)
  assert raw == base


def test_default_threshold_is_otsu_on_the_scores():
  m = evaluate.open_set_metrics(LOGITS, SCORE, "high", LABELS, 2)
  assert m["threshold"] == evaluate.otsu_threshold(SCORE)
  # Otsu splits {0.1, 0.2, 0.25, 0.3} from {0.7, 0.8}: the same rejections as at 0.5.
  assert 0.3 < m["threshold"] <= 0.7
  assert m["open_bacc"] == pytest.approx(2 / 3)
  assert m["open_bacc"] == pytest.approx(np.nanmean(m["per_class_acc"]))


def test_single_group_auroc_is_nan_without_warnings():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    id_only = evaluate.open_set_metrics(LOGITS[:4], SCORE[:4], "high", LABELS[:4], 2,
                                        threshold=0.5)
    ood_only = evaluate.open_set_metrics(LOGITS[4:], SCORE[4:], "high", LABELS[4:], 2,
                                         threshold=0.5)
  assert math.isnan(id_only["auroc"]) and math.isnan(ood_only["auroc"])
  # ID only: pred = [0, 0, 1, 2]; recall 1 and 1/2; no unknown class to average.
  assert id_only["open_bacc"] == pytest.approx(0.75)
  assert math.isnan(id_only["per_class_acc"][2])
  assert math.isnan(ood_only["closed_acc"]) and ood_only["open_bacc"] == 0.5


@pytest.mark.parametrize("args, match", [
    ((LOGITS, SCORE, "above", LABELS, 2), "unknown_if must be 'high' or 'low'"),
    ((LOGITS, SCORE[:5], "high", LABELS, 2), r"score must be \(6,\)"),
    ((LOGITS, SCORE, "high", LABELS, 3), "closed_logits have 2 classes, num_classes is 3"),
    ((LOGITS, SCORE, "high", LABELS[:5], 2), "labels_full has 5 entries for 6 samples"),
    ((LOGITS, np.where(SCORE > 0.5, np.nan, SCORE), "high", LABELS, 2), "NaN or inf"),
])
def test_open_set_metrics_rejects_bad_input(args, match):
  with pytest.raises(ValueError, match=match):
    evaluate.open_set_metrics(*args)


def test_closed_and_per_class_accuracy():
  # argmax = [0, 1, 0]; labels [0, 1, 1] -> 2 of 3.
  logits = np.array([[2.0, 1.0], [0.0, 1.0], [5.0, 0.0]])
  assert evaluate.closed_set_accuracy(logits, np.array([0, 1, 1])) == pytest.approx(2 / 3)
  # Class 0: rows 0, 1 -> 1 hit; class 1: rows 2, 3 -> row 3 predicted 5 (a miss);
  # class 2 absent -> NaN.
  acc = evaluate.per_class_accuracy(np.array([0, 2, 1, 5]), np.array([0, 0, 1, 1]), 3)
  np.testing.assert_array_equal(acc, [0.5, 0.5, np.nan])
  with pytest.raises(ValueError, match="labels hold class 3 but num_classes is 3"):
    evaluate.per_class_accuracy(np.array([0]), np.array([3]), 3)
  with pytest.raises(ValueError, match="at least one sample"):
    evaluate.closed_set_accuracy(np.zeros((0, 2)), np.zeros(0, int))


def test_otsu_hand_computed():
  # [0, 1, 2, 2, 3], 4 bins over [0, 3]: counts [1, 1, 2, 1], centres c = [3/8, 9/8, 15/8, 21/8].
  # w1 * w2 * (m1 - m2)^2 after bin 0: 1 * 4 * (3/8 - 15/8)^2       = 9
  #                       after bin 1: 2 * 3 * (6/8 - 17/8)^2       = 11.34375
  #                       after bin 2: 4 * 1 * (10.5/8 - 21/8)^2     = 6.890625
  # -> threshold = c[1] = 1.125.
  assert evaluate.otsu_threshold(np.array([0.0, 1.0, 2.0, 2.0, 3.0]), nbins=4) == 1.125
  # Bimodal with a gap: [1, 1, 2, 7, 8, 8], 7 bins over [1, 8]: counts [2, 1, 0, 0, 0, 0, 3],
  # centres 1.5..7.5. After bin 0: 2 * 4 * (1.5 - 6.25)^2 = 180.5; after bins 1-5 (the
  # empty bins change nothing): 3 * 3 * (5.5/3 - 7.5)^2 = 289, a tie -> the first, c[1] = 2.5.
  assert evaluate.otsu_threshold(np.array([1.0, 1.0, 2.0, 7.0, 8.0, 8.0]), nbins=7) == 2.5


def test_otsu_separates_two_clusters_and_handles_constants():
  rng = np.random.default_rng(0)
  low, high = rng.normal(0.2, 0.03, 300), rng.normal(0.8, 0.03, 100)
  scores = np.concatenate([low, high])
  threshold = evaluate.otsu_threshold(scores)
  # Every split in the gap ties; the first wins: the centre of the bin holding low.max().
  half_bin = (scores.max() - scores.min()) / 256 / 2
  assert abs(threshold - low.max()) <= half_bin and threshold < high.min()
  assert evaluate.otsu_threshold(np.full(5, 0.3)) == 0.3
  assert evaluate.otsu_threshold(np.array([0.7])) == 0.7
  with pytest.raises(ValueError, match="at least one score"):
    evaluate.otsu_threshold(np.array([]))
  with pytest.raises(ValueError, match="nbins must be an integer >= 2"):
    evaluate.otsu_threshold(scores, nbins=1)
  with pytest.raises(ValueError, match="NaN or inf"):
    evaluate.otsu_threshold(np.array([0.1, np.inf]))


@pytest.mark.parametrize("algorithm", ["fixmatch", "supervised"])
def test_msp_score_is_low_for_unknowns(algorithm):
  # Row 0: softmax(ln 3, 0) = [0.75, 0.25]; row 1 uniform.
  score, rule = evaluate.ood_score(algorithm, {"logits": np.array([[np.log(3), 0.0], [0.0, 0.0]])})
  np.testing.assert_allclose(score, [0.75, 0.5])
  assert rule == "low"


@pytest.mark.parametrize("algorithm", ["iomatch", "ggriomatch"])
def test_iomatch_score_is_max_p_times_r_pos(algorithm):
  # p = softmax(ln 3, 0) = [0.75, 0.25] for both rows.
  # Row 0: r_pos = sigmoid(pos - neg) = [1/2, 3/4] -> q = [0.375, 0.1875], score 0.375.
  # Row 1: r_pos = [1/10, 1/2] -> q = [0.075, 0.125], score 0.125 (an outlier-like row).
  logits = np.array([[np.log(3), 0.0], [np.log(3), 0.0]])
  mb = np.zeros((2, 2, 2))
  mb[0, 1] = [0.0, np.log(3)]
  mb[1, 0] = [np.log(9), 0.0]
  score, rule = evaluate.ood_score(algorithm, {"logits": logits, "logits_mb": mb})
  np.testing.assert_allclose(score, [0.375, 0.125])
  assert rule == "low"


@pytest.mark.parametrize("algorithm", ["openmatch", "ggropenmatch"])
def test_openmatch_score_is_p_neg_of_the_predicted_class(algorithm):
  # Row 0 predicts class 1: its (neg, pos) = (ln 4, 0) -> p_neg = 0.8 (class 0 has 0.1).
  # Row 1 predicts class 0: (neg, pos) = (0, ln 9) -> p_neg = 0.1.
  logits = np.array([[0.0, 2.0], [2.0, 0.0]])
  ova = np.zeros((2, 2, 2))
  ova[0, :, 0] = [0.0, np.log(9)]
  ova[0, :, 1] = [np.log(4), 0.0]
  ova[1, :, 0] = [0.0, np.log(9)]
  ova[1, :, 1] = [np.log(4), 0.0]
  score, rule = evaluate.ood_score(algorithm, {"logits": logits, "logits_ova": ova})
  np.testing.assert_allclose(score, [0.8, 0.1])
  assert rule == "high"


def test_ood_score_rejects_bad_input():
  logits = np.zeros((3, 2))
  with pytest.raises(ValueError, match="No OOD score for algorithm 'dac'"):
    evaluate.ood_score("dac", {"logits": logits})
  with pytest.raises(KeyError, match="'logits_ova' for openmatch"):
    evaluate.ood_score("openmatch", {"logits": logits})
  with pytest.raises(ValueError, match=r"must be \(N, 2, K\)"):
    evaluate.ood_score("iomatch", {"logits": logits, "logits_mb": np.zeros((3, 2, 3))})


def test_evaluate_outputs_combines_both_splits():
  # openmatch outputs for the toy set: p_neg of the predicted class = SCORE exactly.
  pred = LOGITS.argmax(1)
  ova = np.zeros((6, 2, 2))
  ova[np.arange(6), 0, pred] = np.log(SCORE / (1 - SCORE))
  full = {"logits": LOGITS, "logits_ova": ova}
  id_test = {"logits": np.array([[1.0, 0.0], [1.0, 0.0]])}  # argmax [0, 0] vs [0, 1]
  out = evaluate.evaluate_outputs("openmatch", id_test, np.array([0, 1]), full, LABELS, 2)
  assert out["closed_acc"] == 0.5 and out["full_closed_acc"] == 1.0
  assert out["auroc"] == pytest.approx(0.75)
  assert out["open_bacc"] == pytest.approx(2 / 3)
  assert out["algorithm"] == "openmatch"


@pytest.mark.parametrize("algorithm", ["fixmatch", "supervised", "msp"])
def test_official_rule_rejects_msp_below_a_fixed_095(algorithm):
  # Otsu on these MSPs would split {0.55, 0.6} from {0.9, 0.93, 0.97, 0.99}; the official
  # eval.py rejects every MSP below 0.95, so the 0.9 and 0.93 rows become unknown too.
  msp = np.array([0.99, 0.9, 0.93, 0.97, 0.55, 0.6])
  logits = np.log(np.stack([msp, 1.0 - msp], axis=1))  # argmax 0 everywhere, MSP = msp
  labels = np.array([0, 0, 0, 0, 2, 2])
  official = evaluate.evaluate_outputs(algorithm, {"logits": logits[:4]}, labels[:4],
                                       {"logits": logits}, labels, 2)
  otsu = evaluate.evaluate_outputs(algorithm, {"logits": logits[:4]}, labels[:4],
                                   {"logits": logits}, labels, 2, threshold_rule="otsu")
  assert official["threshold"] == 0.95 and official["unknown_rate"] == pytest.approx(4 / 6)
  assert 0.6 < otsu["threshold"] < 0.9 and otsu["unknown_rate"] == pytest.approx(2 / 6)
  assert official["auroc"] == otsu["auroc"]  # the threshold moves no ranking


@pytest.mark.parametrize("algorithm", ["iomatch", "openmatch"])
def test_official_rule_is_otsu_for_the_open_set_heads(algorithm):
  score = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.25])
  assert evaluate.threshold_for(algorithm, score) == evaluate.otsu_threshold(score)
  assert evaluate.threshold_for(algorithm, score, "otsu") == evaluate.otsu_threshold(score)


def test_unknown_threshold_rule_names_the_choices():
  with pytest.raises(ValueError, match="choose one of .'official', 'otsu'"):
    evaluate.threshold_for("fixmatch", np.ones(3), "fixed")
