"""Reject inference: methods that use the unlabelled rejects, and the protocol that measures them."""

from finance.reject_inference.methods import (
    METHODS,
    AcceptedOnly,
    FuzzyAugmentation,
    HardCutoff,
    Parcelling,
    RejectInferenceClassifier,
    Reweighting,
    SelfTraining,
    make_method,
)
from finance.reject_inference.protocol import ProtocolConfig, kickout, replay_policy, run_protocol

__all__ = ["METHODS", "AcceptedOnly", "FuzzyAugmentation", "HardCutoff", "Parcelling", "ProtocolConfig",
           "RejectInferenceClassifier", "Reweighting", "SelfTraining", "kickout", "make_method", "replay_policy",
           "run_protocol"]
