"""kv/page_list.PageList: the cached array follows every change of the list."""
import numpy as np
import pytest

from tierserve.kv.page_list import PageList


@pytest.mark.parametrize("change", [
    lambda p: p.__setitem__(1, -4), lambda p: p.__setitem__(slice(0, 2), [9, 9]), lambda p: p.__delitem__(0),
    lambda p: p.append(6), lambda p: p.extend([6, 7]), lambda p: p.insert(0, 8), lambda p: p.pop(),
    lambda p: p.remove(2), lambda p: p.clear(), lambda p: p.sort(), lambda p: p.reverse()])
def test_array_follows_every_change(change):
    p = PageList([3, 2, 5])
    a = p.array()
    assert a.dtype == np.int64 and a.tolist() == [3, 2, 5] and p.array() is a      # cached while unchanged
    with pytest.raises(ValueError):
        a[0] = 1                                                                    # read-only
    change(p)
    assert p.array().tolist() == list(p)


def test_in_place_operators_keep_the_type():
    p = PageList([1])
    p.array()
    p += [2]
    p *= 2
    assert isinstance(p, PageList) and p.array().tolist() == [1, 2, 1, 2]
