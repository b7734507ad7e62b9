"""The sequence model: a MoE Transformer over six-month behaviour histories, and its LightGBM blend."""

from finance.sequence.ensemble import SequenceEnsemble
from finance.sequence.estimator import SequenceClassifier, SequenceTrainingConfig
from finance.sequence.model import SequenceTransformer, SequenceTransformerConfig
from finance.sequence.tokens import TAIWAN_LAYOUT, MonthlyLayout, SequenceBatch, SequenceTokenizer

__all__ = ["TAIWAN_LAYOUT", "MonthlyLayout", "SequenceBatch", "SequenceClassifier", "SequenceEnsemble",
           "SequenceTokenizer", "SequenceTrainingConfig", "SequenceTransformer", "SequenceTransformerConfig"]
