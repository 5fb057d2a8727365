"""Reading the items table's numeric columns without pyarrow's ``to_numpy`` (which imports pandas)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from mmsearch.store import _numbers

TYPES = [(pa.int64(), np.int64, st.integers(-2**62, 2**62)), (pa.int32(), np.int32, st.integers(-2**31, 2**31 - 1)),
         (pa.float64(), np.float64, st.floats(allow_nan=False, width=64)),
         (pa.float32(), np.float32, st.floats(allow_nan=False, width=32))]


@st.composite
def columns(draw):
    """A chunked column of one type, with nulls only in float columns, and chunks that are slices."""
    typ, dtype, values = draw(st.sampled_from(TYPES))
    floats = np.issubdtype(dtype, np.floating)
    chunks = []
    for _ in range(draw(st.integers(0, 3))):
        items = draw(st.lists(st.none() | values if floats else values, max_size=20))
        arr = pa.array(items, typ)
        start = draw(st.integers(0, len(items)))
        chunks.append(arr.slice(start, draw(st.integers(0, len(items) - start))))
    return pa.chunked_array(chunks, typ), dtype


@settings(max_examples=200, deadline=None)
@given(columns())
def test_numbers_match_to_numpy(case):
    column, dtype = case
    want = np.asarray(column.to_numpy(), dtype=dtype)  # the reference (it imports pandas; fine in a test)
    got = _numbers(column, dtype)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, want)
