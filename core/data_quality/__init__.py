"""Data quality in three levels, for any dataset the product reads (the design guide's filtering):

1. rules (`rules`): schema and range checks, exact and near duplicates, contradictions, leakage;
2. domains (`domains`): segments or regimes, their coverage by the training data, unseen domains;
3. labels (`labels`): confident learning (cleanlab) on out-of-fold predicted probabilities.

`check.run_check` runs the levels on a `table.CheckedTable` that a dataset's adapter builds
(finance/data_quality.py, manufacturing/*/data_quality.py); `report` writes the HTML and JSON.
"""
