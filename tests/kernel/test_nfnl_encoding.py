"""nfnetlink element encoding: the precomputed per-shape headers (hot path) give exactly the bytes that
building every attribute one by one gives."""

from hypothesis import given, strategies as st

from tcpha.steering.nfnl import ElementBatch, element_reference


@given(key=st.binary(min_size=1, max_size=24), data=st.none() | st.binary(min_size=1, max_size=12),
       timeout=st.none() | st.integers(min_value=0, max_value=2 ** 64 - 1))
def test_add_matches_attribute_by_attribute(key, data, timeout):
    fast = ElementBatch()
    fast.add(5, "tbl", "map", [(key, data, timeout), (key, data, timeout)])
    ref = ElementBatch()._list(5, "tbl", "map", [element_reference(key, data, timeout)] * 2)
    assert fast.messages[0][2] == ref


@given(keys=st.lists(st.binary(min_size=1, max_size=24), min_size=1, max_size=5))
def test_destroy_matches_attribute_by_attribute(keys):
    fast = ElementBatch()
    fast.destroy(5, "tbl", "set", keys)
    assert fast.messages[0][2] == ElementBatch()._list(5, "tbl", "set",
                                                        [element_reference(k, None, None) for k in keys])
