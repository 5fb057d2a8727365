"""The items table without pandas: numeric columns read without pyarrow's ``to_numpy``, and every
column written without ``pa.array`` (both import pandas when it is installed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from mmsearch.store import _arrow, _native, _numbers

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


def _same(got: pa.Array, want: pa.Array) -> None:
    assert got.type == want.type and got.null_count == want.null_count
    g, w = got.to_pylist(), want.to_pylist()
    assert [x != x for x in g] == [x != x for x in w]  # NaN where pyarrow has NaN
    assert [x for x in g if x == x] == [x for x in w if x == x]


FLOATS = [(pa.float64(), st.floats(width=64)), (pa.float32(), st.floats(width=32))]
INTS = [(pa.int64(), st.integers(-2**62, 2**62)), (pa.int32(), st.integers(-2**31, 2**31 - 1))]


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(FLOATS + INTS).flatmap(lambda tv: st.tuples(st.just(tv[0]), st.lists(tv[1], max_size=30))))
def test_number_columns_are_built_as_pyarrow_builds_them(case):
    """What the items table is written from: numpy columns (NaN for "none"), as pa.array(numpy) stores them."""
    typ, values = case
    data = np.asarray(values, dtype=_native(typ))
    _same(_arrow(data, typ), pa.array(data, typ))


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.tuples(st.just(pa.string()), st.lists(st.none() | st.text(), max_size=30)),
                 st.tuples(st.just(pa.binary()), st.lists(st.none() | st.binary(), max_size=30))))
def test_string_columns_are_built_as_pyarrow_builds_them(case):
    typ, values = case
    _same(_arrow(values, typ), pa.array(values, typ))


def test_committing_an_index_imports_no_pandas(photo_dir, tmp_path):
    """pa.array imports pandas whenever it is installed (Ray's dependency installs it): 0.8 s of every
    `mmsearch index` run. The items table is built from buffers instead, and reads back the same."""
    folder, mapping = photo_dir
    code = ("import sys, json; from mmsearch.indexing import index_folder; from mmsearch.store import Collection; "
            f"index_folder({str(folder)!r}, {str(tmp_path / 'index')!r}); "
            f"c = Collection.open({str(tmp_path / 'index')!r}); "
            "print(json.dumps({'pandas': 'pandas' in sys.modules, 'paths': sorted(c.items.path)}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert got == {"pandas": False, "paths": sorted(str(Path(p).resolve()) for p in mapping.values())}
