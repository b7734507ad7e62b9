"""Credit models behind one interface (`CreditModel`) and a registry: name -> class.

Built in: "scorecard" (WoE logistic scorecard), "lightgbm", "moe" (core's TabularMoE) and
"ensemble". Another model joins without editing these files:

    from finance.models import CreditModel, register_model

    @register_model("sequence")
    class SequenceModel(CreditModel):  # a scikit-learn estimator: clone, get_params, fit(X, y, ...)
        needs_records = True  # X is a FitData that carries the raw records too
        config_class = SequenceModelConfig

        def _fit(self, X, y, sample_weight, X_valid, y_valid): ...  # CreditModel.fit validates, then calls this
        def predict_proba(self, X): ...
        ...

`finance train --model NAME` accepts any registered name; a module that registers models can also be
named in the MOEWORKS_FINANCE_MODELS environment variable (comma-separated) to be imported first.
"""

from finance.models.base import CreditModel, FitData, available_models, build_model, model_class, register_model

__all__ = ["CreditModel", "FitData", "available_models", "build_model", "model_class", "register_model"]
