"""moeworks finance: credit scoring on 200+ features, from raw records to a batch scoring job.

Public API (see the modules for details):
    finance.data       load_taiwan / load_gmsc / load_generated / load_records -> Records;
                       DATASETS (field rules); CreditDataError on bad input (field and row named)
    finance.generate   GeneratorConfig, generate(out_dir, config): the GENERATED population as Parquet
    finance.features   FeaturePipeline(dataset=...).fit/transform, catalogue(); monthly_sequences()
    finance.models     CreditModel, FitData, register_model, build_model, available_models
    finance.scorer     CreditScorer (pipeline + model + points + cut-off + reason codes),
                       train_scorer, split_records, load_model
    finance.evaluation credit_metrics, evaluate_scorer, scoring_speed, population_stability,
                       characteristic_reference / characteristic_stability (CSI per feature)
    finance.batch      run_batch (chunks, quarantine, resume, Dask), read_scored, read_quarantine
    finance.report     write_report (HTML with embedded plots)
"""

from finance.errors import CreditDataError
from finance.scorer import CreditScorer, load_model

__all__ = ["CreditDataError", "CreditScorer", "load_model"]
