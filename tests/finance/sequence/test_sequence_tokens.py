import numpy as np
import pandas as pd
import pytest
import torch

from finance.data import load_taiwan
from finance.sequence.model import SequenceTransformer, SequenceTransformerConfig
from finance.sequence.tokens import STATUS_PAD, TAIWAN_LAYOUT, SequenceDataError, SequenceTokenizer


@pytest.fixture(scope="module")
def frame(data_root):
    return load_taiwan(data_root / "taiwan_credit_default").frame.iloc[:400].reset_index(drop=True)


def shorten(frame: pd.DataFrame, row: int, months_kept: int) -> pd.DataFrame:
    """Blank the oldest months of one client, as for an account opened later."""
    frame = frame.copy()
    drop = 6 - months_kept
    for group in (TAIWAN_LAYOUT.status, TAIWAN_LAYOUT.bill, TAIWAN_LAYOUT.payment):
        frame.loc[row, list(group[:drop])] = np.nan
    return frame


def test_tokens_are_ordered_oldest_to_newest(frame):
    batch = SequenceTokenizer().fit(frame).transform(frame)
    assert batch.tokens.shape == (400, 6, 6) and batch.status.shape == (400, 6)
    assert not batch.padding.any()
    # Newest month last: PAY_0 is September (status code = value + 3), PAY_6 April comes first.
    np.testing.assert_array_equal(batch.status[:, -1], frame["PAY_0"].to_numpy().astype(int) + 3)
    np.testing.assert_array_equal(batch.status[:, 0], frame["PAY_6"].to_numpy().astype(int) + 3)
    # The oldest month has no previous statement, so its payment ratio is unknown (flag feature 5).
    raw_flag = batch.tokens[:, :, 5]
    assert len(np.unique(raw_flag[:, 0])) == 1 and raw_flag[:, 0][0] < raw_flag[:, 1][0]


def test_shorter_histories_are_padded_at_their_missing_months(frame):
    tokenizer = SequenceTokenizer().fit(frame)
    short = shorten(shorten(frame, 0, 3), 1, 1)
    batch = tokenizer.transform(short)
    np.testing.assert_array_equal(batch.padding[0], [True, True, True, False, False, False])
    np.testing.assert_array_equal(batch.padding[1], [True] * 5 + [False])
    assert (batch.tokens[0, :3] == 0).all() and (batch.status[0, :3] == STATUS_PAD).all()
    assert not batch.padding[2:].any()


def test_padding_content_cannot_change_the_prediction(frame):
    torch.manual_seed(0)
    tokenizer = SequenceTokenizer().fit(frame)
    model = SequenceTransformer(SequenceTransformerConfig(static_cardinalities=tokenizer.cardinalities)).eval()
    batch = tokenizer.transform(shorten(frame.iloc[:8].reset_index(drop=True), 2, 2))
    inputs = [torch.from_numpy(a.copy()) for a in batch]
    logits, aux = model(*inputs)
    garbage = [a.clone() for a in inputs]
    garbage[0][2, :4] = 50.0  # padded months of client 2 filled with nonsense
    garbage[1][2, :4] = 7
    logits2, _ = model(*garbage)
    torch.testing.assert_close(logits, logits2)
    assert logits.shape == (8,) and aux.ndim == 0
    # Each client's score does not depend on who else is in the batch, whatever the lengths.
    alone = torch.stack([model(*(a[i:i + 1] for a in inputs))[0][0] for i in range(8)])
    torch.testing.assert_close(alone, logits, atol=1e-5, rtol=1e-5)
    # And a shorter history is not the same as a full one: the mask is used.
    full = [torch.from_numpy(a.copy()) for a in tokenizer.transform(frame.iloc[:8].reset_index(drop=True))]
    assert not torch.allclose(model(*full)[0][2], logits[2])


def test_bad_values_name_the_column_and_row(frame):
    tokenizer = SequenceTokenizer().fit(frame)
    bad = frame.astype(object)
    bad.loc[5, "BILL_AMT3"] = "lots"
    with pytest.raises(SequenceDataError, match=r"'BILL_AMT3', row 5"):
        tokenizer.transform(bad)
    with pytest.raises(SequenceDataError, match="LIMIT_BAL"):
        tokenizer.transform(frame.assign(LIMIT_BAL=0.0))
    with pytest.raises(SequenceDataError, match="PAY_AMT2"):
        tokenizer.transform(frame.drop(columns="PAY_AMT2"))


def test_tokenizer_round_trips_through_a_dict(frame):
    tokenizer = SequenceTokenizer().fit(frame)
    again = SequenceTokenizer.from_dict(tokenizer.to_dict())
    for a, b in zip(tokenizer.transform(frame), again.transform(frame), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_layout_with_day_counts_channels_and_string_levels():
    from finance.sequence.tokens import MonthlyLayout

    rng = np.random.default_rng(0)
    n, months = 50, 4
    cols = lambda f: tuple(f"{f}_m{m}" for m in range(months, 0, -1))  # noqa: E731 - oldest first
    layout = MonthlyLayout(status=cols("dpd"), bill=cols("balance"), payment=cols("paid"), limit="limit",
                           static_numeric=("age",), static_categorical=("segment",),
                           channels=(cols("spend"), cols("atm")), status_in_days=True)
    frame = pd.DataFrame({c: rng.integers(0, 90, n) for c in cols("dpd")}
                         | {c: rng.random(n) * 1000 for f in ("balance", "paid", "spend", "atm") for c in cols(f)}
                         | {"limit": 5000.0, "age": rng.integers(20, 70, n),
                            "segment": rng.choice(["salaried", "student", "retired"], n)})
    frame.loc[0, "dpd_m1"] = 31  # 31 days past due: 2 months late
    tokenizer = SequenceTokenizer(layout=layout).fit(frame.iloc[1:])
    batch = tokenizer.transform(frame)
    assert batch.tokens.shape == (n, months, 6 + 2) and layout.num_token_features == 8
    assert batch.status[0, -1] == 2 + 3  # code = months late + 3
    assert set(batch.static_categorical[:, 0]) <= {1, 2, 3}
    unseen = tokenizer.transform(frame.assign(segment="pensioner"))
    assert (unseen.static_categorical == 0).all()
    again = SequenceTokenizer.from_dict(tokenizer.to_dict())
    np.testing.assert_array_equal(again.transform(frame).tokens, batch.tokens)
