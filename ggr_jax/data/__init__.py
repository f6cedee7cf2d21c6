"""Data: open-set splits (:mod:`openset`), sources (:mod:`digits`), on-device
augmentation (:mod:`augment`) and on-device index sampling (:mod:`sampling`)."""
