"""The sequence model: a MoE Transformer over six-month behaviour histories (its LightGBM blend is the
registry's `sequence-ensemble`, finance.sequence.credit_model)."""

from finance.sequence.estimator import SequenceClassifier, SequenceTrainingConfig
from finance.sequence.model import SequenceTransformer, SequenceTransformerConfig
from finance.sequence.tokens import TAIWAN_LAYOUT, MonthlyLayout, SequenceBatch, SequenceTokenizer

__all__ = ["TAIWAN_LAYOUT", "MonthlyLayout", "SequenceBatch", "SequenceClassifier",
           "SequenceTokenizer", "SequenceTrainingConfig", "SequenceTransformer", "SequenceTransformerConfig"]
