"""Predictive maintenance: remaining useful life on C-MAPSS-format data, failures on AI4I 2020.

Entry points:
- `cmapss`: read and validate C-MAPSS files (columns `unit`, `cycle`, `setting_1..3`, `s_1..s_21`).
- `rul.RULEstimator`: the LSTM or MoE RUL model, trained with `core.trainer.Trainer`, saved to a dir.
- `streaming.StreamingRULPredictor`: one cycle at a time per unit, for the digital twin.
- `generator`: run-to-failure trajectories in the C-MAPSS format (generated, not real).
- `ai4i.AI4IFailureModel`: failure and its five modes on AI4I 2020 (LightGBM beside a small MoE).
"""
